//! The policy engine: pure Rust, no proxy-wasm. The glue in `crate::filter` (wasm32
//! only) and the native tools drive it through this API.
//!
//! Life of a message:
//! 1. [`Policy::compile`] once, when the plugin is configured.
//! 2. Per exchange, [`Policy::identify_upstream`] / [`Policy::identify_caller`] name the
//!    services, [`Policy::route`] says from the canonical path whether the route is
//!    covered at all (if it is not, nothing is buffered or inspected; see [`route`]).
//! 3. Per message (request or response): [`Policy::plan_headers`] / [`Policy::plan_body`]
//!    read what is needed and say which subjects' consent must come from the consent store;
//!    the caller gathers those answers (cache or HTTP call) and then
//!    [`Policy::judge_headers`] / [`Policy::judge_body`] decide and produce the changes.
//! 4. [`Policy::decision_log`] turns the verdicts of one message into its log entry, the
//!    decision record v2 ([`DecisionLog`]).
//!
//! [`machine::Machine`] runs that sequence for one exchange as a sans-IO state machine
//! (events in, actions out); the proxy-wasm glue only translates callbacks and host calls.

mod actions;
mod compile;
mod consent;
mod decision;
mod encoding;
mod eval;
mod jsonpath;
pub mod machine;
mod matcher;
pub mod policy;
mod policy_read;
pub mod positions;
pub mod route;
mod selector;
mod stream;
// The tree evaluator, the streaming path's oracle in tests: native builds only.
#[cfg(not(target_arch = "wasm32"))]
mod strict_json;
#[cfg(not(target_arch = "wasm32"))]
mod tree;

pub use actions::{subject_pseudonym, SUBJECT_TAG};
pub use compile::{
    category_covers, Action, Policy, PolicyError, PolicyErrors, RouteMatch, StoreConfig,
};
pub use consent::{
    cache_decode, cache_encode, parse_store_response, store_request_body, ConsentAnswer,
    HeaderConsent, StoreAnswers,
};
pub use decision::{
    parse_subject_ranges, subject_ranges, DecisionGroup, DecisionLog, Grant, Outcome, Reason,
    LOG_PREFIX, MAX_LOGGED_PATHS, RECORD_VERSION,
};
pub use eval::{
    BodyPlan, BodyVerdict, Exchange, HeaderPlan, HeaderVerdict, IdentitySource, Party, Report,
    Uninspectable, UninspectableKind,
};
pub use policy_read::read_policy;
#[cfg(not(target_arch = "wasm32"))]
pub use tree::TreePlan;

/// Which way a message travels. A request body goes to the upstream service; a response
/// body goes back to the caller. Decisions are about the recipient of the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Response => "response",
        }
    }
}

/// Appends one object key to a normalized JSONPath (`$.a`, `$['b c']`), as decision
/// records write field paths; for tools and tests that locate what a decision names.
pub fn push_path_key(path: &mut String, key: &str) {
    selector::push_edge(path, selector::Edge::Key(key));
}

/// Index of a service in the compiled policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceId(pub(crate) usize);

/// Index of a message binding in the compiled policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BindingId(pub(crate) usize);

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_bypass;
#[cfg(test)]
mod tests_machine;
