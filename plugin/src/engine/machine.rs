//! The life of one exchange as a sans-IO state machine: events in, actions out.
//!
//! The proxy-wasm glue (`crate::filter`) turns each host callback into an [`Event`] and
//! hands it to [`Machine::handle`]. The machine never calls the host: it answers with a
//! [`Step`], which holds the fire-and-forget [`Effect`]s to apply in order (log a line,
//! count, set a filter-state property, cache a consent answer, send a local reply,
//! resume a stream) and a [`Next`]: return `Continue` or `Pause` from the callback, or
//! first do one thing whose outcome the machine must know (read the headers or the body,
//! dispatch a consent-store call, apply header or body edits) and hand the outcome back
//! as the matching event. Two things the machine asks synchronously, through [`Env`]:
//! the clock and the cross-VM consent cache.
//!
//! The sequence, per direction: headers (a request first gives only `:method` and
//! `:path`, so uncovered traffic costs two header reads) → header plan → consent answers
//! (cache, else one store call; the message waits) → header verdict and its edits → body
//! chunks (paused until the end, refused past the policy's limit) → body plan → consent
//! answers → body verdict and its edit → decision record and, when enforcing, the block
//! or refusal. A body that ends while a store call is in flight is judged as soon as the
//! call answers. Everything that goes wrong for a covered message ends in a refusal with
//! a reason (or, with `fail: open`, a logged pass), never a silent pass.
//!
//! Native tests drive it without a VM (`tests_machine.rs`); the harness and the e2e
//! suite run it inside the real `.wasm`.

use super::consent::{cache_decode, cache_encode, parse_store_response, store_request_body};
use super::decision::{DecisionLog, Outcome, LOG_PREFIX};
use super::eval::{BodyPlan, Exchange, Report, Uninspectable, UninspectableKind};
use super::policy::Mode;
use super::{route, Direction, Policy, StoreAnswers};
use std::rc::Rc;

/// Filter state (`wasm.<name>`) holding the exchange's decision entries as a JSON array.
pub const DECISION_PROPERTY: &str = "consentry_decision";
/// Filter state holding the exchange's most severe outcome.
pub const OUTCOME_PROPERTY: &str = "consentry_outcome";

/// What the host tells the machine.
#[derive(Debug)]
pub enum Event {
    /// A message's headers arrived (`on_http_request_headers` / `..._response_headers`).
    HeadersArrived {
        direction: Direction,
        end_of_stream: bool,
    },
    /// Answer to [`Next::ReadRoute`]: the request's `:method` and `:path`, `None` where
    /// the host could not give them.
    Route {
        method: Option<String>,
        path: Option<String>,
    },
    /// Answer to [`Next::ReadHeaders`]. `principal` (the peer certificate's URI SAN) and
    /// `cluster` (the upstream cluster's name) are read for the request only.
    Headers {
        direction: Direction,
        headers: Result<Vec<(String, String)>, String>,
        principal: Option<String>,
        cluster: Option<String>,
    },
    /// A body chunk arrived; `size` is what the host has buffered so far.
    Body {
        direction: Direction,
        size: usize,
        end_of_stream: bool,
    },
    /// Trailers arrived: the body is complete.
    Trailers { direction: Direction },
    /// Answer to [`Next::ReadBody`].
    BodyRead {
        direction: Direction,
        body: Result<Vec<u8>, String>,
    },
    /// Answer to [`Next::Dispatch`]: the call's token, or why it could not be made.
    Dispatched(Result<u32, String>),
    /// Answer to [`Next::Edit`]: every edit applied, or the first that failed.
    Edited(Result<(), EditFailed>),
    /// The consent store answered call `token`: its `:status` (`None`: no answer at all,
    /// i.e. timeout, reset or connection failure) and body.
    StoreAnswer {
        token: u32,
        status: Option<String>,
        body: Option<Vec<u8>>,
    },
}

/// An edit of [`Next::Edit`] that the host refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditFailed {
    /// Index of the edit in the list.
    pub index: usize,
    /// The host's status, for the log.
    pub status: String,
}

/// One change to a message in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Remove every value of a header.
    RemoveHeader(String),
    /// Add one value of a header.
    AddHeader(String, String),
    /// Replace a header's value (`:path` for a rewritten query).
    ReplaceHeader(String, String),
    /// Replace the first `size` bytes of the body (all of it) with `body`.
    ReplaceBody { size: usize, body: Vec<u8> },
}

/// A consent-store call to dispatch (`POST`, JSON body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCall {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// Something to do that the machine does not need to hear back about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Log(Level, String),
    /// Add `n` to counter `name` (defined on first use).
    Count(String, usize),
    /// Set a filter-state property.
    SetProperty(&'static str, Vec<u8>),
    /// Store a consent answer in the cross-VM cache.
    CacheSet(String, Vec<u8>),
    /// A best-effort edit: its failure changes nothing the policy depends on.
    TryEdit(Direction, Edit),
    /// Answer the exchange from the filter (JSON body, `x-consentry: refused` when
    /// `refused`). If the host cannot (the response has started), the glue resets the
    /// stream instead, so nothing else gets through.
    LocalReply {
        status: u32,
        body: Vec<u8>,
        refused: bool,
    },
    /// Resume a stream paused for a consent-store call.
    Resume(Direction),
}

/// What the glue does once the step's effects are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Return `Continue` from the callback.
    Continue,
    /// Return `Pause` from the callback (or keep the stream paused).
    Pause,
    /// Nothing to return: the event came from outside a stream callback (a store answer).
    Done,
    /// Read `:method` and `:path` of the request; answer with [`Event::Route`].
    ReadRoute,
    /// Read the message's headers; answer with [`Event::Headers`].
    ReadHeaders(Direction),
    /// Read the first `size` bytes of the body (`usize::MAX`: all of it); answer with
    /// [`Event::BodyRead`].
    ReadBody { direction: Direction, size: usize },
    /// Make the call; answer with [`Event::Dispatched`].
    Dispatch(StoreCall),
    /// Apply the edits in order, stopping at the first failure; answer with
    /// [`Event::Edited`].
    Edit(Direction, Vec<Edit>),
}

/// The machine's answer to one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub effects: Vec<Effect>,
    pub next: Next,
}

/// What the machine asks the host synchronously.
pub trait Env {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// The cross-VM cache entry under `key`.
    fn cached(&self, key: &str) -> Option<Vec<u8>>;
}

/// Per-direction state of one exchange.
#[derive(Default)]
struct Side {
    covered: bool,
    content_type: Option<String>,
    content_encoding: Option<String>,
    report: Report,
    /// The body phase is over (decided, refused or not needed).
    done: bool,
    /// The body ended while the header phase waited for the consent store (with its
    /// size, when the host said it), so it is judged as soon as the headers are.
    ended_while_pending: Option<Option<usize>>,
}

/// A consent-store call in flight, and what to do when it answers.
struct Pending {
    token: u32,
    direction: Direction,
    phase: Phase,
    subjects: Vec<String>,
    answers: StoreAnswers,
}

enum Phase {
    Headers {
        headers: Vec<(String, String)>,
        end_of_stream: bool,
    },
    Body {
        plan: BodyPlan,
        size: usize,
    },
}

/// What the machine waits for after a [`Next`] that needs an answer.
enum Awaiting {
    Route {
        end_of_stream: bool,
    },
    Headers {
        direction: Direction,
        end_of_stream: bool,
    },
    Body {
        direction: Direction,
    },
    Dispatch {
        direction: Direction,
        phase: Phase,
        subjects: Vec<String>,
        answers: StoreAnswers,
    },
    HeaderEdits {
        direction: Direction,
        end_of_stream: bool,
        report: Report,
        /// What each edit rewrote, for the refusal if the host refuses it.
        what: Vec<String>,
    },
    BodyEdit {
        direction: Direction,
    },
}

/// One exchange (request and response) through the filter.
pub struct Machine {
    policy: Option<Rc<Policy>>,
    ex: Option<Rc<Exchange>>,
    req: Side,
    resp: Side,
    pending: Option<Pending>,
    awaiting: Option<Awaiting>,
    /// Set while a store answer is handled: a final `Continue` resumes this stream.
    resuming: Option<Direction>,
    /// Decision entries so far, as JSON.
    entries: Vec<String>,
    worst: Option<Outcome>,
    replied: bool,
    effects: Vec<Effect>,
}

/// Keeps stat names to characters Envoy's stats and Prometheus accept.
fn stat_part(s: &str) -> String {
    if s.starts_with("unknown(") {
        return "unknown".into();
    }
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn first<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn too_large(policy: &Policy) -> Uninspectable {
    Uninspectable::new(
        UninspectableKind::TooLarge,
        format!(
            "body is over the policy's limit of {} bytes",
            policy.max_body_bytes()
        ),
    )
}

fn malformed(detail: impl Into<String>) -> Uninspectable {
    Uninspectable::new(UninspectableKind::Malformed, detail)
}

impl Machine {
    /// A new exchange under `policy` (`None`: the plugin has no valid policy, and every
    /// exchange is refused).
    pub fn new(policy: Option<Rc<Policy>>) -> Self {
        Machine {
            policy,
            ex: None,
            req: Side::default(),
            resp: Side::default(),
            pending: None,
            awaiting: None,
            resuming: None,
            entries: Vec::new(),
            worst: None,
            replied: false,
            effects: Vec::new(),
        }
    }

    /// Handles one event.
    pub fn handle(&mut self, event: Event, env: &dyn Env) -> Step {
        let next = self.dispatch(event, env);
        let next = self.settle(next, env);
        Step {
            effects: std::mem::take(&mut self.effects),
            next,
        }
    }

    /// The filter answered the exchange itself (a block, a refusal, no policy).
    pub fn replied(&self) -> bool {
        self.replied
    }

    fn dispatch(&mut self, event: Event, env: &dyn Env) -> Next {
        let awaiting = self.awaiting.take();
        match (event, awaiting) {
            (
                Event::HeadersArrived {
                    direction,
                    end_of_stream,
                },
                None,
            ) => self.headers_arrived(direction, end_of_stream),
            (Event::Route { method, path }, Some(Awaiting::Route { end_of_stream })) => {
                self.route(method, path, end_of_stream)
            }
            (
                Event::Headers {
                    direction,
                    headers,
                    principal,
                    cluster,
                },
                Some(Awaiting::Headers {
                    direction: d,
                    end_of_stream,
                }),
            ) if d == direction => {
                self.on_headers(direction, headers, principal, cluster, end_of_stream, env)
            }
            (
                Event::Body {
                    direction,
                    size,
                    end_of_stream,
                },
                None,
            ) => self.on_body(direction, Some(size), end_of_stream, env),
            (Event::Trailers { direction }, None) => {
                // Trailers end a message whose last body callback did not say so (HTTP/2).
                let side = self.side(direction);
                if !side.covered || side.done || self.replied {
                    return Next::Continue;
                }
                self.on_body(direction, None, true, env)
            }
            (Event::BodyRead { direction, body }, Some(Awaiting::Body { direction: d }))
                if d == direction =>
            {
                self.body_read(direction, body, env)
            }
            (
                Event::Dispatched(result),
                Some(Awaiting::Dispatch {
                    direction,
                    phase,
                    subjects,
                    answers,
                }),
            ) => match result {
                Ok(token) => {
                    self.count("consentry.consent_store.calls", 1);
                    self.pending = Some(Pending {
                        token,
                        direction,
                        phase,
                        subjects,
                        answers,
                    });
                    Next::Pause
                }
                Err(e) => {
                    let cluster = self
                        .policy
                        .as_ref()
                        .and_then(|p| p.consent_store())
                        .map(|s| s.cluster.clone())
                        .unwrap_or_default();
                    self.finish(
                        direction,
                        Some(Uninspectable::new(
                            UninspectableKind::ConsentStore,
                            format!("could not call the consent store cluster `{cluster}` ({e}); is the cluster defined in Envoy?"),
                        )),
                        env,
                    )
                }
            },
            (
                Event::Edited(result),
                Some(Awaiting::HeaderEdits {
                    direction,
                    end_of_stream,
                    report,
                    what,
                }),
            ) => match result {
                Ok(()) => self.headers_judged(direction, end_of_stream, report, env),
                Err(f) => {
                    let what = what
                        .get(f.index)
                        .cloned()
                        .unwrap_or_else(|| "a header".into());
                    self.finish(
                        direction,
                        Some(malformed(format!(
                            "could not rewrite {what} ({})",
                            f.status
                        ))),
                        env,
                    )
                }
            },
            (Event::Edited(result), Some(Awaiting::BodyEdit { direction })) => match result {
                Ok(()) => self.finish(direction, None, env),
                Err(f) => self.finish(
                    direction,
                    Some(malformed(format!(
                        "could not replace the body ({})",
                        f.status
                    ))),
                    env,
                ),
            },
            (
                Event::StoreAnswer {
                    token,
                    status,
                    body,
                },
                awaiting,
            ) => {
                self.awaiting = awaiting;
                self.store_answer(token, status, body, env)
            }
            (event, awaiting) => {
                // The glue answered something other than what was asked: a bug in the
                // glue. Nothing about the exchange can be trusted now; refuse it.
                let asked = awaiting.is_some();
                self.effects.push(Effect::Log(
                    Level::Error,
                    format!(
                        "consentry: unexpected event {} ({}); refusing the exchange",
                        event_name(&event),
                        if asked {
                            "another answer was awaited"
                        } else {
                            "nothing was asked"
                        }
                    ),
                ));
                self.refuse_unexpected(env)
            }
        }
    }

    /// Turns a final answer into what the context of the event needs: after a store
    /// answer, `Continue` resumes the paused stream, and the callback returns nothing.
    fn settle(&mut self, mut next: Next, env: &dyn Env) -> Next {
        let Some(d) = self.resuming else {
            return next;
        };
        if next == Next::Continue {
            // The body ended while the call was in flight: judge it now.
            if let Some(size) = self.side(d).ended_while_pending.take() {
                next = self.on_body(d, size, true, env);
                if next != Next::Continue && next != Next::Pause {
                    return next;
                }
                return self.settle(next, env);
            }
        }
        match next {
            Next::Continue => {
                self.resuming = None;
                self.effects.push(Effect::Resume(d));
                Next::Done
            }
            Next::Pause | Next::Done => {
                self.resuming = None;
                Next::Done
            }
            other => other,
        }
    }

    fn side(&mut self, d: Direction) -> &mut Side {
        match d {
            Direction::Request => &mut self.req,
            Direction::Response => &mut self.resp,
        }
    }

    fn enforcing(&self) -> bool {
        self.policy
            .as_ref()
            .is_some_and(|p| p.mode() == Mode::Enforce)
    }

    fn count(&mut self, name: impl Into<String>, n: usize) {
        self.effects.push(Effect::Count(name.into(), n));
    }

    fn headers_arrived(&mut self, d: Direction, end_of_stream: bool) -> Next {
        if d == Direction::Response && (self.replied || self.resp.done) {
            return Next::Continue;
        }
        if self.policy.is_none() {
            return self.no_policy();
        }
        match d {
            Direction::Request => {
                self.awaiting = Some(Awaiting::Route { end_of_stream });
                Next::ReadRoute
            }
            Direction::Response => {
                self.awaiting = Some(Awaiting::Headers {
                    direction: d,
                    end_of_stream,
                });
                Next::ReadHeaders(d)
            }
        }
    }

    /// Traffic no binding covers, in either direction, costs two header reads: it is
    /// recognised from `:method` and `:path` alone, before any other header, property or
    /// allocation, and the rest of the exchange is not looked at. (The consent header
    /// is still removed: it is never for the upstream.) A header the host cannot give
    /// takes the full path, which refuses what it cannot read.
    fn route(&mut self, method: Option<String>, path: Option<String>, end_of_stream: bool) -> Next {
        let Some(policy) = self.policy.clone() else {
            return self.no_policy();
        };
        let uncovered = match (&method, &path) {
            (Some(m), Some(p)) => !policy.may_cover(m, p),
            _ => false,
        };
        if !uncovered {
            self.awaiting = Some(Awaiting::Headers {
                direction: Direction::Request,
                end_of_stream,
            });
            return Next::ReadHeaders(Direction::Request);
        }
        if let Some(name) = policy.consent_header() {
            if self.enforcing() {
                self.effects.push(Effect::TryEdit(
                    Direction::Request,
                    Edit::RemoveHeader(name.to_string()),
                ));
            }
        }
        // Both sides are done before they start: every later callback returns at once.
        self.req.done = true;
        self.resp.done = true;
        // Requests that reached the VM although no binding covers them: what a route
        // table generated from the policy (envoy/README.md) keeps out of it.
        self.count("consentry.uncovered", 1);
        Next::Continue
    }

    /// Headers of either direction, read.
    fn on_headers(
        &mut self,
        d: Direction,
        headers: Result<Vec<(String, String)>, String>,
        principal: Option<String>,
        cluster: Option<String>,
        end_of_stream: bool,
        env: &dyn Env,
    ) -> Next {
        let Some(policy) = self.policy.clone() else {
            return self.no_policy();
        };
        let headers = match headers {
            Ok(h) => h,
            Err(s) => {
                if d == Direction::Request {
                    // Without the request's headers nothing can be known about it.
                    self.ex = Some(Rc::new(policy.exchange(
                        None,
                        "",
                        "",
                        policy.identify_caller(None, None),
                        policy.identify_upstream(None, None),
                        &[],
                    )));
                }
                return self.finish(
                    d,
                    Some(malformed(format!(
                        "could not read headers from the host ({s})"
                    ))),
                    env,
                );
            }
        };
        if d == Direction::Request {
            let caller = policy.identify_caller_in(principal.as_deref(), &headers);
            let upstream =
                policy.identify_upstream(cluster.as_deref(), first(&headers, ":authority"));
            let request_id = first(&headers, "x-request-id").map(str::to_string);
            let method = first(&headers, ":method").unwrap_or("");
            let path = first(&headers, ":path").unwrap_or("");
            let ex = policy.exchange(request_id, method, path, caller, upstream, &headers);
            // Known now: a response that needs nothing from this filter (no binding
            // covers it, or it goes to a caller that may have everything and is not to be
            // logged) is let through without even reading its headers.
            self.resp.done = match ex.binding(Direction::Response) {
                None => true,
                Some(b) => {
                    !policy.log_untouched()
                        && policy.decided_at_headers(b, ex.recipient(Direction::Response).service)
                }
            };
            let refusal = ex.route_refusal.clone();
            self.ex = Some(Rc::new(ex));
            // The consent header is a message from the gateway to this filter: it names
            // subjects, and the upstream has no purpose for it, trusted or not. Every
            // spelling the engine reads as it (`x_consentry_consent` too) goes.
            if let Some(name) = policy.consent_header() {
                if self.enforcing() {
                    let mut spellings: Vec<&str> = Vec::new();
                    for (k, _) in &headers {
                        if route::header_name_eq(k, name) && !spellings.contains(&k.as_str()) {
                            spellings.push(k);
                        }
                    }
                    for k in spellings {
                        self.effects.push(Effect::TryEdit(
                            Direction::Request,
                            Edit::RemoveHeader(k.to_string()),
                        ));
                    }
                }
            }
            if let Some(refusal) = refusal {
                // A path with no single safe reading that some reading of could be
                // covered: refused before anything else is looked at.
                self.resp.done = true;
                return self.finish(d, Some(refusal), env);
            }
        }
        let Some(ex) = self.ex.clone() else {
            return Next::Continue;
        };
        if self.replied {
            return Next::Continue;
        }
        let binding = ex.binding(d);
        let side = self.side(d);
        side.covered = binding.is_some();
        side.content_type = first(&headers, "content-type").map(str::to_string);
        side.content_encoding = first(&headers, "content-encoding").map(str::to_string);
        let Some(binding) = binding else {
            side.done = true;
            return Next::Continue;
        };
        let recipient = ex.recipient(d).service;
        if policy.decided_at_headers(binding, recipient) {
            // Nothing in this message could be changed: do not buffer it. Logged (with
            // the grants) only on request, like a message that held no declared data.
            if !policy.log_untouched() {
                side.done = true;
                return Next::Continue;
            }
            side.report.unread = policy.unread_grants(binding, recipient);
            return self.finish(d, None, env);
        }
        let plan = policy.plan_headers(&ex, d, &headers);
        let mut answers = StoreAnswers::new();
        let missing = cached_answers(&policy, &plan.store_subjects, &mut answers, env);
        if !missing.is_empty() {
            return self.call_store(
                d,
                Phase::Headers {
                    headers,
                    end_of_stream,
                },
                missing,
                answers,
                env,
            );
        }
        self.judge_headers(d, &headers, end_of_stream, &answers, env)
    }

    fn judge_headers(
        &mut self,
        d: Direction,
        headers: &[(String, String)],
        end_of_stream: bool,
        answers: &StoreAnswers,
        env: &dyn Env,
    ) -> Next {
        let (Some(policy), Some(ex)) = (self.policy.clone(), self.ex.clone()) else {
            return Next::Pause;
        };
        let verdict = policy.judge_headers(&ex, d, headers, answers);
        let mut edits = Vec::new();
        let mut what = Vec::new();
        if self.enforcing() && !verdict.report.is_blocked() {
            for (name, values) in &verdict.set_headers {
                edits.push(Edit::RemoveHeader(name.clone()));
                what.push(format!("header {name}"));
                for v in values {
                    edits.push(Edit::AddHeader(name.clone(), v.clone()));
                    what.push(format!("header {name}"));
                }
            }
            if let Some(path) = &verdict.new_path {
                edits.push(Edit::ReplaceHeader(":path".into(), path.clone()));
                what.push("the query".into());
            }
        }
        if edits.is_empty() {
            return self.headers_judged(d, end_of_stream, verdict.report, env);
        }
        self.awaiting = Some(Awaiting::HeaderEdits {
            direction: d,
            end_of_stream,
            report: verdict.report,
            what,
        });
        Next::Edit(d, edits)
    }

    /// The header verdict is applied: merge it, and end the message or wait for its body.
    fn headers_judged(
        &mut self,
        d: Direction,
        end_of_stream: bool,
        report: Report,
        env: &dyn Env,
    ) -> Next {
        self.side(d).report.merge(report);
        if end_of_stream || self.side(d).report.is_blocked() {
            // A blocked message is blocked now: its body does not need to be read.
            return self.finish(d, None, env);
        }
        if self.enforcing() {
            // The body may change size; Envoy does not fix content-length for us.
            self.effects.push(Effect::TryEdit(
                d,
                Edit::RemoveHeader("content-length".into()),
            ));
            if d == Direction::Response {
                self.effects.push(Effect::TryEdit(
                    d,
                    Edit::AddHeader("x-consentry-hold".into(), "1".into()),
                ));
            }
        }
        Next::Continue
    }

    /// A body chunk of a buffered total of `size` bytes (`None`: not said); `end` when the
    /// message is complete.
    fn on_body(&mut self, d: Direction, size: Option<usize>, end: bool, env: &dyn Env) -> Next {
        if self.replied {
            // The rest of the request is held back; the response is our own local reply,
            // which must flow out untouched.
            return match d {
                Direction::Request => Next::Pause,
                Direction::Response => Next::Continue,
            };
        }
        let Some(policy) = self.policy.clone() else {
            return self.no_policy();
        };
        let side = self.side(d);
        if !side.covered || side.done {
            return Next::Continue;
        }
        if self.pending.is_some() {
            if end {
                self.side(d).ended_while_pending = Some(size);
            }
            return Next::Pause;
        }
        if size.is_some_and(|n| n > policy.max_body_bytes()) {
            return self.finish(d, Some(too_large(&policy)), env);
        }
        if !end {
            return Next::Pause;
        }
        self.awaiting = Some(Awaiting::Body { direction: d });
        Next::ReadBody {
            direction: d,
            size: size.unwrap_or(usize::MAX),
        }
    }

    fn body_read(&mut self, d: Direction, body: Result<Vec<u8>, String>, env: &dyn Env) -> Next {
        let body = match body {
            Ok(b) => b,
            Err(s) => {
                return self.finish(
                    d,
                    Some(malformed(format!(
                        "could not read the body from the host ({s})"
                    ))),
                    env,
                )
            }
        };
        let (Some(policy), Some(ex)) = (self.policy.clone(), self.ex.clone()) else {
            return Next::Pause;
        };
        let size = body.len();
        if size > policy.max_body_bytes() {
            return self.finish(d, Some(too_large(&policy)), env);
        }
        let side = self.side(d);
        let plan = match policy.plan_body_owned(
            &ex,
            d,
            side.content_type.as_deref(),
            side.content_encoding.as_deref(),
            body,
        ) {
            Ok(p) => p,
            Err(f) => return self.finish(d, Some(f), env),
        };
        let mut answers = StoreAnswers::new();
        let missing = cached_answers(&policy, &plan.store_subjects, &mut answers, env);
        if !missing.is_empty() {
            return self.call_store(d, Phase::Body { plan, size }, missing, answers, env);
        }
        self.judge_body(d, plan, size, &answers, env)
    }

    fn judge_body(
        &mut self,
        d: Direction,
        plan: BodyPlan,
        size: usize,
        answers: &StoreAnswers,
        env: &dyn Env,
    ) -> Next {
        let (Some(policy), Some(ex)) = (self.policy.clone(), self.ex.clone()) else {
            return Next::Pause;
        };
        let verdict = policy.judge_body(&ex, d, plan, answers);
        self.side(d).report.merge(verdict.report);
        if self.enforcing() && !self.side(d).report.is_blocked() {
            if let Some(body) = verdict.body {
                self.awaiting = Some(Awaiting::BodyEdit { direction: d });
                return Next::Edit(d, vec![Edit::ReplaceBody { size, body }]);
            }
        }
        self.finish(d, None, env)
    }

    /// Asks the consent store; the answer arrives as [`Event::StoreAnswer`].
    fn call_store(
        &mut self,
        d: Direction,
        phase: Phase,
        subjects: Vec<String>,
        answers: StoreAnswers,
        env: &dyn Env,
    ) -> Next {
        let store = self.policy.as_ref().and_then(|p| p.consent_store());
        let Some(store) = store else {
            return self.finish(
                d,
                Some(Uninspectable::new(
                    UninspectableKind::ConsentStore,
                    "no consent store configured",
                )),
                env,
            );
        };
        let call = StoreCall {
            cluster: store.cluster.clone(),
            path: store.path.clone(),
            authority: store.authority.clone(),
            body: store_request_body(&subjects),
            timeout_ms: store.timeout_ms,
        };
        self.awaiting = Some(Awaiting::Dispatch {
            direction: d,
            phase,
            subjects,
            answers,
        });
        Next::Dispatch(call)
    }

    fn store_answer(
        &mut self,
        token: u32,
        status: Option<String>,
        body: Option<Vec<u8>>,
        env: &dyn Env,
    ) -> Next {
        let Some(mut pending) = self.pending.take() else {
            return Next::Done;
        };
        if pending.token != token {
            self.pending = Some(pending);
            return Next::Done;
        }
        let d = pending.direction;
        self.resuming = Some(d);
        let Some(policy) = self.policy.clone() else {
            return Next::Pause;
        };
        let parsed = match status.as_deref() {
            Some("200") => match body {
                Some(body) => parse_store_response(&body, &pending.subjects),
                None => Err("consent store answered 200 with no body".to_string()),
            },
            Some(s) => Err(format!("consent store answered status {s}")),
            None => Err(
                "consent store did not answer (timeout, reset or connection failure)".to_string(),
            ),
        };
        let answers = match parsed {
            Ok(a) => a,
            Err(e) => {
                self.count("consentry.consent_store.failures", 1);
                return self.finish(
                    d,
                    Some(Uninspectable::new(UninspectableKind::ConsentStore, e)),
                    env,
                );
            }
        };
        if let Some(store) = policy.consent_store() {
            let expires = env
                .now_ms()
                .saturating_add(store.cache_ttl_s.saturating_mul(1000));
            for (subject, answer) in &answers {
                let (key, id) = policy.cache_slot(subject);
                self.effects
                    .push(Effect::CacheSet(key, cache_encode(&id, answer, expires)));
            }
        }
        pending.answers.extend(answers);
        match pending.phase {
            Phase::Headers {
                headers,
                end_of_stream,
            } => self.judge_headers(d, &headers, end_of_stream, &pending.answers, env),
            Phase::Body { plan, size } => self.judge_body(d, plan, size, &pending.answers, env),
        }
    }

    /// Finishes one direction: logs it and, when enforcing, refuses or blocks.
    fn finish(&mut self, d: Direction, failure: Option<Uninspectable>, env: &dyn Env) -> Next {
        let (Some(policy), Some(ex)) = (self.policy.clone(), self.ex.clone()) else {
            return Next::Pause;
        };
        let side = self.side(d);
        side.done = true;
        let report = std::mem::take(&mut side.report);
        let entry = policy.decision_log(&ex, d, &report, failure.as_ref(), env.now_ms());
        self.emit(&policy, &entry);
        if !entry.enforced {
            return Next::Continue;
        }
        if let Some(f) = &failure {
            let body = policy.uninspectable_response(&ex, d, f);
            self.reply(f.status(d), body, true);
            return Next::Pause;
        }
        if report.is_blocked() {
            let body = policy.block_response(&ex, d, &report);
            self.reply(403, body, true);
            return Next::Pause;
        }
        Next::Continue
    }

    /// Writes one message's decision: the proxy's log, filter state, counters.
    fn emit(&mut self, policy: &Policy, entry: &DecisionLog) {
        if !entry.touched() && !policy.log_untouched() {
            return;
        }
        let json = entry.to_json();
        let level = match entry.outcome {
            Outcome::Allowed | Outcome::Modified => Level::Info,
            _ => Level::Warn,
        };
        self.effects
            .push(Effect::Log(level, format!("{LOG_PREFIX}{json}")));
        self.entries.push(json);
        let all = format!("[{}]", self.entries.join(","));
        self.effects
            .push(Effect::SetProperty(DECISION_PROPERTY, all.into_bytes()));
        if self.worst.is_none_or(|w| entry.outcome > w) {
            self.worst = Some(entry.outcome);
            self.effects.push(Effect::SetProperty(
                OUTCOME_PROPERTY,
                entry.outcome.as_str().as_bytes().to_vec(),
            ));
        }
        let outcome = entry.outcome.as_str();
        self.count(format!("consentry.outcome.{outcome}"), 1);
        self.count(
            format!(
                "consentry.recipient.{}.{outcome}",
                stat_part(&entry.recipient)
            ),
            1,
        );
        self.count(
            format!("consentry.direction.{}.{outcome}", entry.direction),
            1,
        );
        for (category, action, n) in &entry.category_counts {
            if *action != "allow" {
                self.count(
                    format!("consentry.category.{}.{action}", stat_part(category)),
                    *n,
                );
            }
        }
        if let Some(detail) = &entry.detail {
            if entry.outcome == Outcome::Uninspectable {
                let code = detail.split(':').next().unwrap_or("unknown");
                self.count(format!("consentry.uninspectable.{}", stat_part(code)), 1);
            }
        }
    }

    fn reply(&mut self, status: u32, body: Vec<u8>, refused: bool) {
        self.replied = true;
        self.effects.push(Effect::LocalReply {
            status,
            body,
            refused,
        });
    }

    fn no_policy(&mut self) -> Next {
        // Envoy does not start a filter whose configuration failed; if it ever does,
        // nothing passes uninspected.
        self.reply(
            503,
            br#"{"error":"consentry_unconfigured","detail":"the consentry filter has no valid policy"}"#.to_vec(),
            false,
        );
        Next::Pause
    }

    /// The glue broke the protocol: refuse whatever is still open, and log it.
    fn refuse_unexpected(&mut self, env: &dyn Env) -> Next {
        if self.replied {
            return Next::Pause;
        }
        let failure = malformed("the filter lost track of the exchange");
        if self.ex.is_some() {
            for d in [Direction::Request, Direction::Response] {
                if !self.side(d).done {
                    return self.finish(d, Some(failure), env);
                }
            }
        }
        self.reply(
            500,
            br#"{"error":"consentry_internal","detail":"the consentry filter lost track of the exchange"}"#.to_vec(),
            true,
        );
        Next::Pause
    }
}

/// Reads answers from the cross-VM cache; returns the subjects still missing.
fn cached_answers(
    policy: &Policy,
    subjects: &[String],
    answers: &mut StoreAnswers,
    env: &dyn Env,
) -> Vec<String> {
    let now = env.now_ms();
    let mut missing = Vec::new();
    for s in subjects {
        let (key, id) = policy.cache_slot(s);
        match env.cached(&key).and_then(|b| cache_decode(&b, &id, now)) {
            Some(a) => {
                answers.insert(s.clone(), a);
            }
            None => missing.push(s.clone()),
        }
    }
    missing
}

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::HeadersArrived { .. } => "HeadersArrived",
        Event::Route { .. } => "Route",
        Event::Headers { .. } => "Headers",
        Event::Body { .. } => "Body",
        Event::Trailers { .. } => "Trailers",
        Event::BodyRead { .. } => "BodyRead",
        Event::Dispatched(_) => "Dispatched",
        Event::Edited(_) => "Edited",
        Event::StoreAnswer { .. } => "StoreAnswer",
    }
}
