//! The proxy-wasm glue: translates host callbacks into the engine's exchange machine
//! ([`crate::engine::machine`]) events, and the machine's actions into host calls. Every
//! host call goes through `abi` (or, for HTTP calls, `hostcalls`) and its `Result` is
//! handed back to the machine, which decides what a failure means: the SDK's trait
//! helpers unwrap host errors, and a panic here would trap the VM.
//!
//! Failure rule (the machine's): when anything goes wrong for a message the policy
//! covers, the message is refused (or, with `fail: open`, passed and logged) — never
//! passed by accident.

use crate::abi;
use crate::engine::machine::{
    Edit, EditFailed, Effect, Env, Event, Level, Machine, Next, StoreCall,
};
use crate::engine::{Direction, Policy};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { policy: None }) });
}}

fn log(level: LogLevel, msg: &str) {
    let _ = abi::log(level, msg);
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

/// Adds to a counter, defining it on first use. Shows as `wasmcustom.<name>`.
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
            machine: Machine::new(self.policy.clone()),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The host, as the machine's synchronous queries see it.
struct Host;

impl Env for Host {
    fn now_ms(&self) -> u64 {
        abi::current_time_nanos()
            .map(|n| n / 1_000_000)
            .unwrap_or(0)
    }

    fn cached(&self, key: &str) -> Option<Vec<u8>> {
        abi::get_shared_data(key).ok().flatten()
    }
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

fn stream_id(d: Direction) -> u32 {
    match d {
        Direction::Request => abi::STREAM_REQUEST,
        Direction::Response => abi::STREAM_RESPONSE,
    }
}

fn apply_edit(d: Direction, edit: &Edit) -> Result<(), abi::HostError> {
    match edit {
        Edit::RemoveHeader(name) => abi::remove_map_value(headers_map(d), name),
        Edit::AddHeader(name, value) => abi::add_map_value(headers_map(d), name, value),
        Edit::ReplaceHeader(name, value) => abi::replace_map_value(headers_map(d), name, value),
        Edit::ReplaceBody { size, body } => abi::set_buffer(body_buffer(d), 0, *size, body),
    }
}

fn apply(effect: Effect) {
    match effect {
        Effect::Log(level, line) => {
            let level = match level {
                Level::Info => LogLevel::Info,
                Level::Warn => LogLevel::Warn,
                Level::Error => LogLevel::Error,
            };
            log(level, &line);
        }
        Effect::Count(name, n) => count_by(&name, n),
        Effect::SetProperty(name, value) => {
            let _ = abi::set_property(&[name], &value);
        }
        Effect::CacheSet(key, value) => {
            let _ = abi::set_shared_data(&key, &value);
        }
        Effect::TryEdit(d, edit) => {
            let _ = apply_edit(d, &edit);
        }
        Effect::LocalReply {
            status,
            body,
            refused,
        } => {
            let mut headers = vec![("content-type", "application/json")];
            if refused {
                headers.push(("x-consentry", "refused"));
            }
            if abi::send_local_response(status, &headers, &body).is_err() {
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
        Effect::Resume(d) => {
            if abi::continue_stream(stream_id(d)).is_err() {
                log(
                    LogLevel::Error,
                    "consentry: could not resume the stream after the consent lookup",
                );
            }
        }
    }
}

/// Does what the machine asks and hands the outcome back as the matching event.
fn answer(next: Next) -> Result<Event, Option<Action>> {
    Ok(match next {
        Next::Continue => return Err(Some(Action::Continue)),
        Next::Pause => return Err(Some(Action::Pause)),
        Next::Done => return Err(None),
        Next::ReadRoute => {
            let read = |name| {
                abi::get_map_value(MapType::HttpRequestHeaders, name)
                    .ok()
                    .flatten()
            };
            Event::Route {
                method: read(":method"),
                path: read(":path"),
            }
        }
        Next::ReadHeaders(direction) => {
            let headers = abi::get_map(headers_map(direction)).map_err(|s| format!("{s:?}"));
            let (principal, cluster) = if direction == Direction::Request {
                (
                    property(&["connection", "uri_san_peer_certificate"]),
                    property(&["xds", "cluster_name"]),
                )
            } else {
                (None, None)
            };
            Event::Headers {
                direction,
                headers,
                principal,
                cluster,
            }
        }
        Next::ReadBody { direction, size } => Event::BodyRead {
            direction,
            body: abi::get_buffer(body_buffer(direction), 0, size)
                .map(Option::unwrap_or_default)
                .map_err(|s| format!("{s:?}")),
        },
        Next::Dispatch(call) => Event::Dispatched(dispatch(&call)),
        Next::Edit(direction, edits) => {
            let failed = edits.iter().enumerate().find_map(|(index, e)| {
                apply_edit(direction, e).err().map(|s| EditFailed {
                    index,
                    status: format!("{s:?}"),
                })
            });
            Event::Edited(failed.map_or(Ok(()), Err))
        }
    })
}

fn dispatch(call: &StoreCall) -> Result<u32, String> {
    hostcalls::dispatch_http_call(
        &call.cluster,
        vec![
            (":method", "POST"),
            (":path", &call.path),
            (":authority", &call.authority),
            ("content-type", "application/json"),
        ],
        Some(&call.body),
        vec![],
        Duration::from_millis(call.timeout_ms),
    )
    .map_err(|s| format!("{s:?}"))
}

/// One exchange: the machine, fed by the callbacks below.
struct Stream {
    machine: Machine,
}

impl Stream {
    /// Hands an event to the machine and serves what it asks until it has an answer for
    /// the callback (`None`: a callback that returns nothing).
    fn drive(&mut self, event: Event) -> Option<Action> {
        let mut event = event;
        loop {
            let step = self.machine.handle(event, &Host);
            for effect in step.effects {
                apply(effect);
            }
            match answer(step.next) {
                Ok(next) => event = next,
                Err(action) => return action,
            }
        }
    }

    fn on(&mut self, event: Event) -> Action {
        // Every stream callback gets Continue or Pause from the machine; `Pause` is the
        // safe reading of anything else.
        self.drive(event).unwrap_or(Action::Pause)
    }
}

impl Context for Stream {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let status = abi::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten();
        let body = abi::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten();
        self.drive(Event::StoreAnswer {
            token,
            status,
            body,
        });
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        self.on(Event::HeadersArrived {
            direction: Direction::Request,
            end_of_stream,
        })
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.on(Event::Body {
            direction: Direction::Request,
            size,
            end_of_stream,
        })
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        self.on(Event::Trailers {
            direction: Direction::Request,
        })
    }

    fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        self.on(Event::HeadersArrived {
            direction: Direction::Response,
            end_of_stream,
        })
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.on(Event::Body {
            direction: Direction::Response,
            size,
            end_of_stream,
        })
    }

    fn on_http_response_trailers(&mut self, _n: usize) -> Action {
        self.on(Event::Trailers {
            direction: Direction::Response,
        })
    }
}
