//! The proxy-wasm glue: reads what Envoy hands the filter, asks the engine, and applies
//! its verdicts. Every host call goes through `hostcalls` and its `Result` is handled:
//! the SDK's trait helpers unwrap host errors, and a panic here would trap the VM.
//!
//! Failure rule: when anything goes wrong for a message the policy covers, the message
//! is refused (or, with `fail: open`, passed and logged) — never passed by accident.

use crate::abi;
use crate::engine::policy::Mode;
use crate::engine::LOG_PREFIX;
use crate::engine::{
    cache_decode, cache_encode, parse_store_response, store_request_body, BodyPlan, DecisionLog,
    Direction, Exchange, Policy, Report, StoreAnswers, Uninspectable, UninspectableKind,
};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// Filter state (`wasm.<name>`) holding the exchange's decision entries as a JSON array.
const DECISION_PROPERTY: &str = "consentry_decision";
/// Filter state holding the exchange's most severe outcome.
const OUTCOME_PROPERTY: &str = "consentry_outcome";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { policy: None }) });
}}

fn log(level: LogLevel, msg: &str) {
    let _ = abi::log(level, msg);
}

fn now_ms() -> u64 {
    abi::current_time_nanos()
        .map(|n| n / 1_000_000)
        .unwrap_or(0)
}

fn property(path: &[&str]) -> Option<String> {
    match abi::get_property(path) {
        Ok(Some(b)) if !b.is_empty() => String::from_utf8(b).ok(),
        _ => None,
    }
}

thread_local! {
    static METRICS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
}

/// Increments a counter, defining it on first use. Shows as `wasmcustom.<name>`.
fn count(name: &str) {
    count_by(name, 1);
}

fn count_by(name: &str, n: usize) {
    let id = METRICS.with(|m| {
        if let Some(id) = m.borrow().get(name) {
            return Some(*id);
        }
        let id = abi::define_metric(MetricType::Counter, name).ok()?;
        m.borrow_mut().insert(name.to_string(), id);
        Some(id)
    });
    if let Some(id) = id {
        let _ = abi::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
    }
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

struct Root {
    policy: Option<Rc<Policy>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = match abi::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(c)) if !c.is_empty() => c,
            _ => {
                log(LogLevel::Critical, "consentry: no policy in the plugin configuration; set `configuration` to the policy JSON");
                return false;
            }
        };
        match Policy::compile(&config, &|name| std::env::var(name).ok()) {
            Ok(p) => {
                log(
                    LogLevel::Info,
                    &format!(
                        "consentry: policy `{}` loaded ({:?} mode)",
                        p.name(),
                        p.mode()
                    ),
                );
                self.policy = Some(Rc::new(p));
                true
            }
            Err(errors) => {
                for e in &errors.0 {
                    log(LogLevel::Critical, &format!("consentry: policy error: {e}"));
                }
                log(LogLevel::Critical, &format!("consentry: policy rejected with {} error(s); the previous configuration, if any, stays", errors.0.len()));
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            policy: self.policy.clone(),
            ex: None,
            req: Side::default(),
            resp: Side::default(),
            pending: None,
            entries: Vec::new(),
            worst: None,
            replied: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
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
    /// The body ended while the header phase waited for the consent store: its size,
    /// so it is judged as soon as the headers are.
    ended_while_pending: Option<usize>,
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

struct Stream {
    policy: Option<Rc<Policy>>,
    ex: Option<Exchange>,
    req: Side,
    resp: Side,
    pending: Option<Pending>,
    entries: Vec<String>,
    worst: Option<crate::engine::Outcome>,
    replied: bool,
}

fn header_map(map: MapType) -> Result<Vec<(String, String)>, abi::HostError> {
    abi::get_map(map)
}

fn first<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn headers_map(d: Direction) -> MapType {
    match d {
        Direction::Request => MapType::HttpRequestHeaders,
        Direction::Response => MapType::HttpResponseHeaders,
    }
}

fn body_buffer(d: Direction) -> BufferType {
    match d {
        Direction::Request => BufferType::HttpRequestBody,
        Direction::Response => BufferType::HttpResponseBody,
    }
}

impl Stream {
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

    /// Writes one message's decision: Envoy's log, filter state, counters.
    fn emit(&mut self, entry: &DecisionLog) {
        let Some(policy) = self.policy.clone() else {
            return;
        };
        if !entry.touched() && !policy.log_untouched() {
            return;
        }
        let json = entry.to_json();
        let level = match entry.outcome {
            crate::engine::Outcome::Allowed | crate::engine::Outcome::Modified => LogLevel::Info,
            _ => LogLevel::Warn,
        };
        log(level, &format!("{LOG_PREFIX}{json}"));
        self.entries.push(json);
        let all = format!("[{}]", self.entries.join(","));
        let _ = abi::set_property(&[DECISION_PROPERTY], all.as_bytes());
        if self.worst.is_none_or(|w| entry.outcome > w) {
            self.worst = Some(entry.outcome);
            let _ = abi::set_property(&[OUTCOME_PROPERTY], entry.outcome.as_str().as_bytes());
        }
        let outcome = entry.outcome.as_str();
        count(&format!("consentry.outcome.{outcome}"));
        count(&format!(
            "consentry.recipient.{}.{outcome}",
            stat_part(&entry.recipient)
        ));
        count(&format!(
            "consentry.direction.{}.{outcome}",
            entry.direction
        ));
        for (category, action, n) in &entry.category_counts {
            if *action != "allow" {
                count_by(
                    &format!("consentry.category.{}.{action}", stat_part(category)),
                    *n,
                );
            }
        }
        if let Some(detail) = &entry.detail {
            if entry.outcome == crate::engine::Outcome::Uninspectable {
                let code = detail.split(':').next().unwrap_or("unknown");
                count(&format!("consentry.uninspectable.{}", stat_part(code)));
            }
        }
    }

    /// Finishes one direction: logs it and, when enforcing, refuses or blocks.
    /// Returns the action for the current callback.
    fn finish(&mut self, d: Direction, failure: Option<Uninspectable>) -> Action {
        let Some(policy) = self.policy.clone() else {
            return Action::Pause;
        };
        let Some(ex) = self.ex.clone() else {
            return Action::Pause;
        };
        let side = self.side(d);
        side.done = true;
        let report = std::mem::take(&mut side.report);
        let entry = policy.decision_log(&ex, d, &report, failure.as_ref(), now_ms());
        self.emit(&entry);
        if !entry.enforced {
            return Action::Continue;
        }
        if let Some(f) = &failure {
            let body = policy.uninspectable_response(&ex, d, f);
            self.reply(f.status(d), &body);
            return Action::Pause;
        }
        if report.is_blocked() {
            let body = policy.block_response(&ex, d, &report);
            self.reply(403, &body);
            return Action::Pause;
        }
        Action::Continue
    }

    fn reply(&mut self, status: u32, body: &[u8]) {
        self.replied = true;
        let headers = vec![
            ("content-type", "application/json"),
            ("x-consentry", "refused"),
        ];
        if abi::send_local_response(status, &headers, body).is_err() {
            // The response has started and cannot be replaced: cut the stream rather
            // than let the rest through.
            log(
                LogLevel::Error,
                "consentry: could not send a local reply; resetting the stream",
            );
            let _ = abi::close_stream(abi::STREAM_RESPONSE);
            let _ = abi::close_stream(abi::STREAM_REQUEST);
        }
    }

    /// Reads answers from the cross-VM cache; returns the subjects still missing.
    fn cached_answers(
        &self,
        policy: &Policy,
        subjects: &[String],
        answers: &mut StoreAnswers,
    ) -> Vec<String> {
        let now = now_ms();
        let mut missing = Vec::new();
        for s in subjects {
            let (key, id) = policy.cache_slot(s);
            let hit = match abi::get_shared_data(&key) {
                Ok(Some(bytes)) => cache_decode(&bytes, &id, now),
                _ => None,
            };
            match hit {
                Some(a) => {
                    answers.insert(s.clone(), a);
                }
                None => missing.push(s.clone()),
            }
        }
        missing
    }

    /// Asks the consent store; on success the answer arrives in `on_http_call_response`.
    fn call_store(
        &mut self,
        d: Direction,
        phase: Phase,
        subjects: Vec<String>,
        answers: StoreAnswers,
    ) -> Result<(), Uninspectable> {
        let policy = self
            .policy
            .clone()
            .ok_or_else(|| Uninspectable::new(UninspectableKind::ConsentStore, "no policy"))?;
        let store = policy.consent_store().ok_or_else(|| {
            Uninspectable::new(
                UninspectableKind::ConsentStore,
                "no consent store configured",
            )
        })?;
        let body = store_request_body(&subjects);
        let token = hostcalls::dispatch_http_call(
            &store.cluster,
            vec![
                (":method", "POST"),
                (":path", &store.path),
                (":authority", &store.authority),
                ("content-type", "application/json"),
            ],
            Some(&body),
            vec![],
            Duration::from_millis(store.timeout_ms),
        )
        .map_err(|s| {
            Uninspectable::new(
                UninspectableKind::ConsentStore,
                format!("could not call the consent store cluster `{}` ({s:?}); is the cluster defined in Envoy?", store.cluster),
            )
        })?;
        count("consentry.consent_store.calls");
        self.pending = Some(Pending {
            token,
            direction: d,
            phase,
            subjects,
            answers,
        });
        Ok(())
    }

    /// Traffic no binding covers, in either direction, costs two header reads: it is
    /// recognised from `:method` and `:path` alone, before any other header, property or
    /// allocation, and the rest of the exchange is not looked at. (The consent header
    /// is still removed: it is never for the upstream.) Anything unexpected, such as a
    /// header the host cannot give, takes the full path, which refuses what it cannot read.
    fn skip_uncovered(&mut self) -> bool {
        let Some(policy) = self.policy.clone() else {
            return false;
        };
        let (Ok(Some(method)), Ok(Some(path))) = (
            abi::get_map_value(MapType::HttpRequestHeaders, ":method"),
            abi::get_map_value(MapType::HttpRequestHeaders, ":path"),
        ) else {
            return false;
        };
        if policy.may_cover(&method, &path) {
            return false;
        }
        if let Some(name) = policy.consent_header() {
            if self.enforcing() && abi::remove_map_value(MapType::HttpRequestHeaders, name).is_err()
            {
                return false;
            }
        }
        // Both sides are done before they start: every later callback returns at once.
        self.req.done = true;
        self.resp.done = true;
        // Requests that reached the VM although no binding covers them: what a route
        // table generated from the policy (envoy/README.md) keeps out of it.
        count("consentry.uncovered");
        true
    }

    /// Headers of either direction.
    fn on_headers(&mut self, d: Direction, end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            return self.no_policy();
        };
        let headers = match header_map(headers_map(d)) {
            Ok(h) => h,
            Err(s) => {
                if d == Direction::Request {
                    // Without the request's headers nothing can be known about it.
                    self.ex = Some(policy.exchange(
                        None,
                        "",
                        "",
                        policy.identify_caller(None, None),
                        policy.identify_upstream(None, None),
                        &[],
                    ));
                }
                return self.finish(
                    d,
                    Some(Uninspectable::new(
                        UninspectableKind::Malformed,
                        format!("could not read headers from the host ({s:?})"),
                    )),
                );
            }
        };
        if d == Direction::Request {
            let principal = property(&["connection", "uri_san_peer_certificate"]);
            let cluster = property(&["xds", "cluster_name"]);
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
            self.ex = Some(ex);
            // The consent header is a message from the gateway to this filter: it names
            // subjects, and the upstream has no purpose for it, trusted or not. Every
            // spelling the engine reads as it (`x_consentry_consent` too) goes.
            if let Some(name) = policy.consent_header() {
                if self.enforcing() {
                    let mut spellings: Vec<&str> = Vec::new();
                    for (k, _) in &headers {
                        if crate::engine::route::header_name_eq(k, name)
                            && !spellings.contains(&k.as_str())
                        {
                            spellings.push(k);
                        }
                    }
                    for k in spellings {
                        let _ = abi::remove_map_value(MapType::HttpRequestHeaders, k);
                    }
                }
            }
            if let Some(refusal) = refusal {
                // A path with no single safe reading that some reading of could be
                // covered: refused before anything else is looked at.
                self.resp.done = true;
                return self.finish(d, Some(refusal));
            }
        }
        let Some(ex) = self.ex.clone() else {
            return Action::Continue;
        };
        if self.replied {
            return Action::Continue;
        }
        let binding = ex.binding(d);
        let side = self.side(d);
        side.covered = binding.is_some();
        side.content_type = first(&headers, "content-type").map(str::to_string);
        side.content_encoding = first(&headers, "content-encoding").map(str::to_string);
        let Some(binding) = binding else {
            side.done = true;
            return Action::Continue;
        };
        let recipient = ex.recipient(d).service;
        if policy.decided_at_headers(binding, recipient) {
            // Nothing in this message could be changed: do not buffer it. Logged (with
            // the grants) only on request, like a message that held no declared data.
            if !policy.log_untouched() {
                side.done = true;
                return Action::Continue;
            }
            side.report.unread = policy.unread_grants(binding, recipient);
            return self.finish(d, None);
        }
        let plan = policy.plan_headers(&ex, d, &headers);
        let mut answers = StoreAnswers::new();
        let missing = self.cached_answers(&policy, &plan.store_subjects, &mut answers);
        if !missing.is_empty() {
            return match self.call_store(
                d,
                Phase::Headers {
                    headers,
                    end_of_stream,
                },
                missing,
                answers,
            ) {
                Ok(()) => Action::Pause,
                Err(f) => self.finish(d, Some(f)),
            };
        }
        self.judge_headers(d, &headers, end_of_stream, &answers)
    }

    fn judge_headers(
        &mut self,
        d: Direction,
        headers: &[(String, String)],
        end_of_stream: bool,
        answers: &StoreAnswers,
    ) -> Action {
        let (Some(policy), Some(ex)) = (self.policy.clone(), self.ex.clone()) else {
            return Action::Pause;
        };
        let verdict = policy.judge_headers(&ex, d, headers, answers);
        let enforcing = self.enforcing();
        if enforcing && !verdict.report.is_blocked() {
            for (name, values) in &verdict.set_headers {
                let ok = if values.is_empty() {
                    abi::remove_map_value(headers_map(d), name).is_ok()
                } else {
                    let mut ok = abi::remove_map_value(headers_map(d), name).is_ok();
                    for v in values {
                        ok &= abi::add_map_value(headers_map(d), name, v).is_ok();
                    }
                    ok
                };
                if !ok {
                    return self.finish(
                        d,
                        Some(Uninspectable::new(
                            UninspectableKind::Malformed,
                            format!("could not rewrite header {name}"),
                        )),
                    );
                }
            }
            if let Some(path) = &verdict.new_path {
                if abi::replace_map_value(headers_map(d), ":path", path).is_err() {
                    return self.finish(
                        d,
                        Some(Uninspectable::new(
                            UninspectableKind::Malformed,
                            "could not rewrite the query",
                        )),
                    );
                }
            }
        }
        self.side(d).report.merge(verdict.report);
        if end_of_stream {
            return self.finish(d, None);
        }
        if self.side(d).report.is_blocked() {
            // Block now: the body does not need to be read.
            return self.finish(d, None);
        }
        if enforcing {
            // The body may change size; Envoy does not fix content-length for us.
            let _ = abi::remove_map_value(headers_map(d), "content-length");
            if d == Direction::Response {
                let _ = abi::add_map_value(headers_map(d), "x-consentry-hold", "1");
            }
        }
        Action::Continue
    }

    /// Body chunks of either direction; `end` when the message is complete.
    fn on_body(&mut self, d: Direction, size: usize, end: bool) -> Action {
        if self.replied {
            return Action::Pause;
        }
        let Some(policy) = self.policy.clone() else {
            return self.no_policy();
        };
        let side = self.side(d);
        if !side.covered || side.done {
            return Action::Continue;
        }
        if self.pending.is_some() {
            if end {
                self.side(d).ended_while_pending = Some(size);
            }
            return Action::Pause;
        }
        if size > policy.max_body_bytes() {
            return self.finish(
                d,
                Some(Uninspectable::new(
                    UninspectableKind::TooLarge,
                    format!(
                        "body is over the policy's limit of {} bytes",
                        policy.max_body_bytes()
                    ),
                )),
            );
        }
        if !end {
            return Action::Pause;
        }
        let body = match abi::get_buffer(body_buffer(d), 0, size) {
            Ok(b) => b.unwrap_or_default(),
            Err(s) => {
                return self.finish(
                    d,
                    Some(Uninspectable::new(
                        UninspectableKind::Malformed,
                        format!("could not read the body from the host ({s:?})"),
                    )),
                )
            }
        };
        let Some(ex) = self.ex.clone() else {
            return Action::Pause;
        };
        let side = self.side(d);
        let size = body.len();
        let plan = match policy.plan_body_owned(
            &ex,
            d,
            side.content_type.as_deref(),
            side.content_encoding.as_deref(),
            body,
        ) {
            Ok(p) => p,
            Err(f) => return self.finish(d, Some(f)),
        };
        let mut answers = StoreAnswers::new();
        let missing = self.cached_answers(&policy, &plan.store_subjects, &mut answers);
        if !missing.is_empty() {
            return match self.call_store(d, Phase::Body { plan, size }, missing, answers) {
                Ok(()) => Action::Pause,
                Err(f) => self.finish(d, Some(f)),
            };
        }
        self.judge_body(d, plan, size, &answers)
    }

    fn judge_body(
        &mut self,
        d: Direction,
        plan: BodyPlan,
        size: usize,
        answers: &StoreAnswers,
    ) -> Action {
        let (Some(policy), Some(ex)) = (self.policy.clone(), self.ex.clone()) else {
            return Action::Pause;
        };
        let verdict = policy.judge_body(&ex, d, plan, answers);
        self.side(d).report.merge(verdict.report);
        if self.enforcing() && !self.side(d).report.is_blocked() {
            if let Some(new_body) = &verdict.body {
                if let Err(s) = abi::set_buffer(body_buffer(d), 0, size, new_body) {
                    return self.finish(
                        d,
                        Some(Uninspectable::new(
                            UninspectableKind::Malformed,
                            format!("could not replace the body ({s:?})"),
                        )),
                    );
                }
            }
        }
        self.finish(d, None)
    }

    /// Trailers end a message whose last body callback did not say so (HTTP/2).
    fn on_trailers(&mut self, d: Direction) -> Action {
        let side = self.side(d);
        if !side.covered || side.done || self.replied {
            return Action::Continue;
        }
        let size = match abi::get_buffer(body_buffer(d), 0, usize::MAX) {
            Ok(Some(b)) => b.len(),
            _ => 0,
        };
        self.on_body(d, size, true)
    }

    fn no_policy(&mut self) -> Action {
        // Envoy does not start a filter whose configuration failed; if it ever does,
        // nothing passes uninspected.
        self.replied = true;
        let _ = abi::send_local_response(
            503,
            &[("content-type", "application/json")],
            br#"{"error":"consentry_unconfigured","detail":"the consentry filter has no valid policy"}"#,
        );
        Action::Pause
    }

    fn resume(d: Direction) {
        let r = match d {
            Direction::Request => abi::continue_stream(abi::STREAM_REQUEST),
            Direction::Response => abi::continue_stream(abi::STREAM_RESPONSE),
        };
        if r.is_err() {
            log(
                LogLevel::Error,
                "consentry: could not resume the stream after the consent lookup",
            );
        }
    }
}

impl Context for Stream {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(mut pending) = self.pending.take() else {
            return;
        };
        if pending.token != token_id {
            self.pending = Some(pending);
            return;
        }
        let d = pending.direction;
        let Some(policy) = self.policy.clone() else {
            return;
        };
        let status = abi::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten();
        let parsed = match status.as_deref() {
            Some("200") => match abi::get_buffer(BufferType::HttpCallResponseBody, 0, body_size) {
                Ok(Some(body)) => parse_store_response(&body, &pending.subjects),
                _ => Err("consent store answered 200 with no body".to_string()),
            },
            Some(s) => Err(format!("consent store answered status {s}")),
            None => Err(
                "consent store did not answer (timeout, reset or connection failure)".to_string(),
            ),
        };
        let answers = match parsed {
            Ok(a) => a,
            Err(e) => {
                count("consentry.consent_store.failures");
                let action = self.finish(
                    d,
                    Some(Uninspectable::new(UninspectableKind::ConsentStore, e)),
                );
                if action == Action::Continue {
                    Self::resume(d);
                }
                return;
            }
        };
        if let Some(store) = policy.consent_store() {
            let expires = now_ms().saturating_add(store.cache_ttl_s.saturating_mul(1000));
            for (subject, answer) in &answers {
                let (key, id) = policy.cache_slot(subject);
                let _ = abi::set_shared_data(&key, &cache_encode(&id, answer, expires));
            }
        }
        pending.answers.extend(answers);
        let mut action = match pending.phase {
            Phase::Headers {
                headers,
                end_of_stream,
            } => self.judge_headers(d, &headers, end_of_stream, &pending.answers),
            Phase::Body { plan, size } => self.judge_body(d, plan, size, &pending.answers),
        };
        if action == Action::Continue {
            if let Some(size) = self.side(d).ended_while_pending.take() {
                action = self.on_body(d, size, true);
            }
        }
        if action == Action::Continue {
            Self::resume(d);
        }
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        if self.skip_uncovered() {
            return Action::Continue;
        }
        self.on_headers(Direction::Request, end_of_stream)
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.on_body(Direction::Request, size, end_of_stream)
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        self.on_trailers(Direction::Request)
    }

    fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        if self.replied || self.resp.done {
            return Action::Continue;
        }
        self.on_headers(Direction::Response, end_of_stream)
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.replied {
            return Action::Continue;
        }
        self.on_body(Direction::Response, size, end_of_stream)
    }

    fn on_http_response_trailers(&mut self, _n: usize) -> Action {
        self.on_trailers(Direction::Response)
    }
}
