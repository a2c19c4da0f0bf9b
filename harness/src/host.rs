//! A proxy-wasm host (ABI 0.2.1) on wasmtime that behaves as Envoy's does, so that what
//! passes here behaves the same in Envoy.
//!
//! It is state-based: feed it an exchange (request, response, connection facts) and it
//! drives the module through Envoy's lifecycle — `_initialize`, root context,
//! `on_vm_start`, `on_configure`, then per exchange a stream context with headers, body
//! chunks, trailers, `on_done`, `on_log`, `on_delete` — and records what came out:
//! headers and bodies as forwarded, local replies, logs, metrics, filter state,
//! outgoing HTTP calls, and a trace of every host call.
//!
//! Envoy behaviours modelled (from Envoy's source and measurements on Envoy 1.40):
//! - body callbacks get the cumulative buffered size after a `Pause`
//!   (StopIterationAndBuffer); `Continue` forwards everything buffered so far;
//! - `set_buffer_bytes` drains `size` bytes from `start == 0` and prepends the data, or
//!   appends when `start >= length`; any other start is `BadArgument`;
//! - a buffered body over the buffer limit is refused by Envoy itself: 413 for a
//!   request, 500 for a response;
//! - a `Pause` from a headers callback stops body callbacks until the filter resumes
//!   the stream (Envoy maps it to StopAllIterationAndWatermark);
//! - header names are lower-case; a repeated header's value lookup returns the first;
//! - properties use Envoy's typed encoding (strings raw, integers 8-byte little-endian);
//! - local replies take effect after the callback returns; a reply sent while the
//!   request is processed is also passed through the response callbacks, as Envoy's
//!   encoder chain does;
//! - `dispatch_http_call` to a cluster the host does not know is `BadArgument`; a call
//!   that times out or fails is answered with no headers and no body.
//!
//! Not modelled (the strict mode fails on them): gRPC calls and streams, foreign
//! functions, ticks after start-up, and network-filter (stream) contexts.

use anyhow::{anyhow, bail, Context as _, Result};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};
use wasmtime::{
    Caller, Engine, Extern, ExternType, FuncType, Instance, Linker, Memory, Module, Store,
    TypedFunc, Val,
};

/// Proxy-wasm `WasmResult` codes, as Envoy returns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    Empty = 7,
    CasMismatch = 8,
    Unimplemented = 12,
}

/// Which header map or buffer an ABI call refers to.
const MAP_REQUEST_HEADERS: i32 = 0;
const MAP_REQUEST_TRAILERS: i32 = 1;
const MAP_RESPONSE_HEADERS: i32 = 2;
const MAP_RESPONSE_TRAILERS: i32 = 3;
const MAP_CALL_RESPONSE_HEADERS: i32 = 6;
const MAP_CALL_RESPONSE_TRAILERS: i32 = 7;
const BUF_REQUEST_BODY: i32 = 0;
const BUF_RESPONSE_BODY: i32 = 1;
const BUF_CALL_RESPONSE_BODY: i32 = 4;
const BUF_VM_CONFIGURATION: i32 = 6;
const BUF_PLUGIN_CONFIGURATION: i32 = 7;

/// Every `env` import the proxy-wasm ABI 0.2.1 defines that this host provides.
pub const ENV_IMPORTS: [&str; 34] = [
    "proxy_log",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_current_time_nanoseconds",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_add_header_map_value",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_status",
    "proxy_set_effective_context",
    "proxy_call_foreign_function",
    "proxy_done",
    "proxy_define_metric",
    "proxy_increment_metric",
];

/// Other imports Envoy provides that modules use: WASI preview 1 and a few extra metrics calls.
const OTHER_IMPORTS: [(&str, &str); 9] = [
    ("wasi_snapshot_preview1", "environ_get"),
    ("wasi_snapshot_preview1", "environ_sizes_get"),
    ("wasi_snapshot_preview1", "fd_write"),
    ("wasi_snapshot_preview1", "proc_exit"),
    ("wasi_snapshot_preview1", "random_get"),
    ("wasi_snapshot_preview1", "clock_time_get"),
    ("env", "proxy_get_log_level"),
    ("env", "proxy_get_metric"),
    ("env", "proxy_record_metric"),
];

/// How the host is set up, as Envoy's plugin and VM configuration would set it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub plugin_name: String,
    pub root_id: String,
    pub vm_id: String,
    /// `vm_config.environment_variables`.
    pub env: Vec<(String, String)>,
    /// Envoy's per-connection buffer limit: a body buffered past it is refused by Envoy.
    pub buffer_limit: usize,
    /// Bodies are delivered in chunks of this many bytes (0: one chunk).
    pub chunk_size: usize,
    /// Fail on any host call the emulator does not model, instead of answering it.
    pub strict: bool,
    /// Record every host call.
    pub trace: bool,
    /// Clusters Envoy knows: an HTTP call to any other is refused at dispatch
    /// (`BadArgument`), as Envoy does.
    pub clusters: Vec<String>,
    /// Envoy's path hygiene as the shipped bootstrap sets it (normalize_path,
    /// merge_slashes, escaped slashes refused): the filter sees the path Envoy would
    /// hand it, and a path Envoy refuses never reaches it ([`crate::envoy_path`]).
    pub path_hygiene: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            plugin_name: "consentry".into(),
            root_id: "consentry".into(),
            vm_id: "consentry".into(),
            env: Vec::new(),
            buffer_limit: 8 * 1024 * 1024,
            chunk_size: 0,
            strict: false,
            trace: false,
            clusters: Vec::new(),
            path_hygiene: true,
        }
    }
}

/// A log line the module wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    pub level: &'static str,
    pub message: String,
}

/// An HTTP call the module dispatched.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HttpCall {
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    #[serde(serialize_with = "ser_bytes")]
    pub body: Vec<u8>,
    pub timeout_ms: u32,
}

/// How the outside world answers an HTTP call.
#[derive(Debug, Clone)]
pub enum CallAnswer {
    Response {
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Timeout or connection failure: Envoy answers with no headers and no body.
    Failure,
}

/// A reply the filter sent itself instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    #[serde(serialize_with = "ser_bytes")]
    pub body: Vec<u8>,
    pub details: String,
}

fn ser_bytes<S: serde::Serializer>(b: &[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}

/// A message as it left the filter towards its recipient.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Delivered {
    pub headers: Vec<(String, String)>,
    #[serde(serialize_with = "ser_bytes")]
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
}

/// The input of one exchange.
#[derive(Debug, Clone, Default)]
pub struct ExchangeInput {
    pub request_headers: Vec<(String, String)>,
    pub request_body: Vec<u8>,
    pub request_trailers: Vec<(String, String)>,
    /// The upstream's answer; `None`: it never answers (the response phase does not run).
    pub response: Option<Delivered>,
    /// Property values by dotted path (`xds.cluster_name`), already in Envoy's encoding.
    pub properties: BTreeMap<String, Vec<u8>>,
}

/// What happened to one direction.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fate {
    /// The message reached its recipient, as shown.
    Forwarded(Delivered),
    /// The filter answered locally instead (from this direction's callbacks).
    Replied(LocalReply),
    /// Envoy itself refused it (the body went over the buffer limit).
    EnvoyRefused { status: u32, reason: String },
    /// The filter paused and never resumed: in Envoy the stream would hang until a
    /// timeout.
    Stalled { at: String },
    /// The direction never ran (the request was answered locally, or no response).
    NotReached,
}

/// Everything one exchange produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExchangeOutput {
    pub request: Fate,
    pub response: Fate,
    /// What the client received in the end (status, headers, body), if anything.
    pub client: Option<Delivered>,
    pub logs: Vec<LogLine>,
    pub filter_state: BTreeMap<String, String>,
    pub http_calls: Vec<HttpCall>,
    pub trace: Vec<String>,
    /// The VM trapped (or a strict-mode violation): Envoy with FAIL_CLOSED answers 503
    /// and the VM must be restarted.
    pub trap: Option<String>,
}

/// A counter, gauge or histogram the module defined.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Metric {
    pub name: String,
    pub kind: &'static str,
    pub value: i64,
}

#[derive(Default)]
struct StreamState {
    context_id: u32,
    request_headers: Vec<(String, String)>,
    request_trailers: Vec<(String, String)>,
    response_headers: Vec<(String, String)>,
    response_trailers: Vec<(String, String)>,
    request_body: Vec<u8>,
    response_body: Vec<u8>,
    in_response: bool,
    local_reply: Option<LocalReply>,
    resumed_request: bool,
    resumed_response: bool,
    reset: bool,
    properties: BTreeMap<String, Vec<u8>>,
    filter_state: BTreeMap<String, String>,
}

struct CallState {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// The host side of one VM.
pub struct HostState {
    settings: Settings,
    memory: Option<Memory>,
    alloc: Option<TypedFunc<i32, i32>>,
    plugin_config: Vec<u8>,
    shared: HashMap<String, (Vec<u8>, u32)>,
    queues: Vec<(String, VecDeque<Vec<u8>>)>,
    metrics: Vec<Metric>,
    logs: Vec<LogLine>,
    trace: Vec<String>,
    violation: Option<String>,
    stream: StreamState,
    next_token: u32,
    pending_calls: VecDeque<(u32, HttpCall)>,
    calls: Vec<HttpCall>,
    call_response: Option<CallState>,
    effective_context: u32,
    tick_ms: u32,
}

impl HostState {
    fn new(settings: Settings, plugin_config: Vec<u8>) -> Self {
        HostState {
            settings,
            memory: None,
            alloc: None,
            plugin_config,
            shared: HashMap::new(),
            queues: Vec::new(),
            metrics: Vec::new(),
            logs: Vec::new(),
            trace: Vec::new(),
            violation: None,
            stream: StreamState::default(),
            next_token: 1,
            pending_calls: VecDeque::new(),
            calls: Vec::new(),
            call_response: None,
            effective_context: 0,
            tick_ms: 0,
        }
    }

    fn map(&self, kind: i32) -> Option<&Vec<(String, String)>> {
        let s = &self.stream;
        match kind {
            MAP_REQUEST_HEADERS if s.context_id != 0 => Some(&s.request_headers),
            MAP_REQUEST_TRAILERS if s.context_id != 0 => Some(&s.request_trailers),
            MAP_RESPONSE_HEADERS if s.in_response => Some(&s.response_headers),
            MAP_RESPONSE_TRAILERS if s.in_response => Some(&s.response_trailers),
            MAP_CALL_RESPONSE_HEADERS => self.call_response.as_ref().map(|c| &c.headers),
            MAP_CALL_RESPONSE_TRAILERS => self.call_response.as_ref().map(|_| &EMPTY_MAP),
            _ => None,
        }
    }

    fn map_mut(&mut self, kind: i32) -> Option<&mut Vec<(String, String)>> {
        let s = &mut self.stream;
        match kind {
            MAP_REQUEST_HEADERS if s.context_id != 0 => Some(&mut s.request_headers),
            MAP_REQUEST_TRAILERS if s.context_id != 0 => Some(&mut s.request_trailers),
            MAP_RESPONSE_HEADERS if s.in_response => Some(&mut s.response_headers),
            MAP_RESPONSE_TRAILERS if s.in_response => Some(&mut s.response_trailers),
            _ => None,
        }
    }

    fn buffer(&self, kind: i32) -> Option<&[u8]> {
        match kind {
            BUF_REQUEST_BODY if self.stream.context_id != 0 => Some(&self.stream.request_body),
            BUF_RESPONSE_BODY if self.stream.in_response => Some(&self.stream.response_body),
            BUF_CALL_RESPONSE_BODY => self.call_response.as_ref().map(|c| c.body.as_slice()),
            BUF_PLUGIN_CONFIGURATION => Some(&self.plugin_config),
            BUF_VM_CONFIGURATION => Some(&[]),
            _ => None,
        }
    }

    fn property(&self, path: &str) -> Option<Vec<u8>> {
        let s = &self.settings;
        match path {
            "plugin_name" => Some(s.plugin_name.clone().into_bytes()),
            "plugin_root_id" => Some(s.root_id.clone().into_bytes()),
            "plugin_vm_id" => Some(s.vm_id.clone().into_bytes()),
            _ => self.stream.properties.get(path).cloned().or_else(|| {
                // Filter state the module set is readable back under its own name.
                self.stream
                    .filter_state
                    .get(path)
                    .map(|v| v.clone().into_bytes())
            }),
        }
    }

    fn note(&mut self, call: impl FnOnce() -> String) {
        if self.settings.trace {
            let line = call();
            self.trace.push(line);
        }
    }

    fn unmodelled(&mut self, what: &str) -> Result<i32> {
        self.note(|| format!("{what} (not modelled)"));
        if self.settings.strict {
            let msg =
                format!("strict mode: the module called {what}, which this host does not model");
            self.violation = Some(msg.clone());
            bail!(msg);
        }
        Ok(Status::Unimplemented as i32)
    }
}

static EMPTY_MAP: Vec<(String, String)> = Vec::new();

// ---- guest memory ------------------------------------------------------------------

fn mem(caller: &mut Caller<'_, HostState>) -> Result<Memory> {
    caller
        .data()
        .memory
        .ok_or_else(|| anyhow!("the module exports no memory"))
}

fn read(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Result<Vec<u8>> {
    let m = mem(caller)?;
    let (p, l) = (ptr as u32 as usize, len as u32 as usize);
    m.data(&caller)
        .get(p..p.saturating_add(l))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| anyhow!("the module passed memory out of bounds ({p}+{l})"))
}

fn read_str(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Result<String> {
    Ok(String::from_utf8_lossy(&read(caller, ptr, len)?).into_owned())
}

fn write_u32(caller: &mut Caller<'_, HostState>, ptr: i32, v: u32) -> Result<()> {
    let m = mem(caller)?;
    m.write(&mut *caller, ptr as u32 as usize, &v.to_le_bytes())
        .map_err(|_| anyhow!("the module passed a return pointer out of bounds"))
}

fn write_u64(caller: &mut Caller<'_, HostState>, ptr: i32, v: u64) -> Result<()> {
    let m = mem(caller)?;
    m.write(&mut *caller, ptr as u32 as usize, &v.to_le_bytes())
        .map_err(|_| anyhow!("the module passed a return pointer out of bounds"))
}

/// Copies `data` into memory the module allocates and writes its address and size to
/// the return pointers; empty data is returned as a null pointer, as Envoy does.
fn give(
    caller: &mut Caller<'_, HostState>,
    data: &[u8],
    ret_ptr: i32,
    ret_size: i32,
) -> Result<()> {
    let mut addr = 0u32;
    if !data.is_empty() {
        let alloc = caller
            .data()
            .alloc
            .clone()
            .ok_or_else(|| anyhow!("the module exports no allocator"))?;
        let len =
            i32::try_from(data.len()).map_err(|_| anyhow!("value too large for the module"))?;
        addr = alloc.call(&mut *caller, len)? as u32;
        if addr == 0 {
            bail!(
                "the module's allocator returned null for {} bytes",
                data.len()
            );
        }
        let m = mem(caller)?;
        m.write(&mut *caller, addr as usize, data)
            .map_err(|_| anyhow!("the module's allocator returned memory out of bounds"))?;
    }
    write_u32(caller, ret_ptr, addr)?;
    write_u32(caller, ret_size, data.len() as u32)
}

/// Answers a lookup: the value into module memory, or `NotFound`; traced either way.
fn give_lookup(
    caller: &mut Caller<'_, HostState>,
    call: String,
    value: Option<&[u8]>,
    ret_ptr: i32,
    ret_size: i32,
) -> Result<i32> {
    let found = value.is_some();
    caller
        .data_mut()
        .note(|| format!("{call} -> {}", if found { "found" } else { "NotFound" }));
    match value {
        Some(v) => {
            give(caller, v, ret_ptr, ret_size)?;
            Ok(Status::Ok as i32)
        }
        None => Ok(Status::NotFound as i32),
    }
}

/// A property path as the ABI passes it (segments separated by NUL), dotted.
fn read_path(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Result<String> {
    let raw = read(caller, ptr, len)?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect::<Vec<_>>()
        .join("."))
}

/// proxy-wasm header map serialisation: count, (key len, value len)*, then each key
/// and value followed by a NUL.
pub fn serialize_pairs(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

pub fn deserialize_pairs(b: &[u8]) -> Result<Vec<(String, String)>> {
    let u32_at = |i: usize| -> Result<usize> {
        let s = b
            .get(i..i + 4)
            .ok_or_else(|| anyhow!("header map data is truncated"))?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
    };
    if b.is_empty() {
        return Ok(Vec::new());
    }
    let n = u32_at(0)?;
    let mut sizes = Vec::with_capacity(n.min(4096));
    for i in 0..n {
        sizes.push((u32_at(4 + i * 8)?, u32_at(8 + i * 8)?));
    }
    let mut pos = 4 + n * 8;
    let mut out = Vec::with_capacity(sizes.len());
    for (kl, vl) in sizes {
        let k = b
            .get(pos..pos + kl)
            .ok_or_else(|| anyhow!("header map key is truncated"))?;
        pos += kl + 1;
        let v = b
            .get(pos..pos + vl)
            .ok_or_else(|| anyhow!("header map value is truncated"))?;
        pos += vl + 1;
        out.push((
            String::from_utf8_lossy(k).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        ));
    }
    Ok(out)
}

fn level_name(l: i32) -> &'static str {
    match l {
        0 => "trace",
        1 => "debug",
        2 => "info",
        3 => "warn",
        4 => "error",
        _ => "critical",
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn i(v: &Val) -> i32 {
    match v {
        Val::I32(x) => *x,
        Val::I64(x) => *x as i32,
        _ => 0,
    }
}

fn i64v(v: &Val) -> i64 {
    match v {
        Val::I64(x) => *x,
        Val::I32(x) => i64::from(*x),
        _ => 0,
    }
}

/// One host function, dispatched by name. `a` are the call's arguments.
fn dispatch(name: &str, caller: &mut Caller<'_, HostState>, a: &[Val]) -> Result<i32> {
    let arg = |n: usize| a.get(n).map(i).unwrap_or(0);
    let ok = Ok(Status::Ok as i32);
    match name {
        "proxy_log" => {
            let msg = read_str(caller, arg(1), arg(2))?;
            let level = level_name(arg(0));
            caller.data_mut().logs.push(LogLine {
                level,
                message: msg,
            });
            ok
        }
        "proxy_get_log_level" => {
            write_u32(caller, arg(0), 0)?;
            ok
        }
        "proxy_get_current_time_nanoseconds" => {
            write_u64(caller, arg(0), now_nanos())?;
            ok
        }
        "proxy_set_tick_period_milliseconds" => {
            caller.data_mut().tick_ms = arg(0) as u32;
            ok
        }
        "proxy_get_buffer_bytes" => {
            let (kind, start, max) = (arg(0), arg(1) as u32 as usize, arg(2) as u32 as usize);
            let Some(buf) = caller.data().buffer(kind) else {
                return Ok(Status::NotFound as i32);
            };
            if start > buf.len() {
                return Ok(Status::BadArgument as i32);
            }
            let end = start.saturating_add(max).min(buf.len());
            let data = buf[start..end].to_vec();
            caller.data_mut().note(|| {
                format!(
                    "get_buffer_bytes({kind}, {start}, {max}) -> {} bytes",
                    data.len()
                )
            });
            give(caller, &data, arg(3), arg(4))?;
            ok
        }
        "proxy_set_buffer_bytes" => {
            let (kind, start, size) = (arg(0), arg(1) as u32 as usize, arg(2) as u32 as usize);
            let data = read(caller, arg(3), arg(4))?;
            let st = &mut caller.data_mut().stream;
            let buf = match kind {
                BUF_REQUEST_BODY if st.context_id != 0 => &mut st.request_body,
                BUF_RESPONSE_BODY if st.in_response => &mut st.response_body,
                _ => return Ok(Status::NotFound as i32),
            };
            let status = if start == 0 {
                let drain = size.min(buf.len());
                buf.drain(..drain);
                buf.splice(0..0, data.iter().copied());
                Status::Ok
            } else if start >= buf.len() {
                buf.extend_from_slice(&data);
                Status::Ok
            } else {
                Status::BadArgument
            };
            caller.data_mut().note(|| {
                format!(
                    "set_buffer_bytes({kind}, {start}, {size}, {} bytes) -> {status:?}",
                    data.len()
                )
            });
            Ok(status as i32)
        }
        "proxy_get_header_map_pairs" => {
            let kind = arg(0);
            let Some(map) = caller.data().map(kind) else {
                return Ok(Status::BadArgument as i32);
            };
            let data = serialize_pairs(map);
            caller
                .data_mut()
                .note(|| format!("get_header_map_pairs({kind})"));
            give(caller, &data, arg(1), arg(2))?;
            ok
        }
        "proxy_set_header_map_pairs" => {
            let kind = arg(0);
            let pairs = deserialize_pairs(&read(caller, arg(1), arg(2))?)?;
            let Some(map) = caller.data_mut().map_mut(kind) else {
                return Ok(Status::BadArgument as i32);
            };
            *map = pairs
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            caller
                .data_mut()
                .note(|| format!("set_header_map_pairs({kind})"));
            ok
        }
        "proxy_get_header_map_value" => {
            let kind = arg(0);
            let key = read_str(caller, arg(1), arg(2))?.to_ascii_lowercase();
            let Some(map) = caller.data().map(kind) else {
                return Ok(Status::BadArgument as i32);
            };
            let value = map.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
            give_lookup(
                caller,
                format!("get_header_map_value({kind}, {key})"),
                value.as_deref().map(str::as_bytes),
                arg(3),
                arg(4),
            )
        }
        "proxy_replace_header_map_value" | "proxy_add_header_map_value" => {
            let kind = arg(0);
            let key = read_str(caller, arg(1), arg(2))?.to_ascii_lowercase();
            let value = read_str(caller, arg(3), arg(4))?;
            let replace = name == "proxy_replace_header_map_value";
            let Some(map) = caller.data_mut().map_mut(kind) else {
                return Ok(Status::BadArgument as i32);
            };
            if replace {
                // Envoy's setCopy: the first entry is replaced, later ones removed.
                match map.iter().position(|(k, _)| *k == key) {
                    Some(first) => {
                        map[first].1 = value;
                        let mut idx = 0;
                        map.retain(|(k, _)| {
                            let keep = idx <= first || *k != key;
                            idx += 1;
                            keep
                        });
                    }
                    None => map.push((key.clone(), value)),
                }
            } else {
                map.push((key.clone(), value));
            }
            caller.data_mut().note(|| format!("{name}({kind}, {key})"));
            ok
        }
        "proxy_remove_header_map_value" => {
            let kind = arg(0);
            let key = read_str(caller, arg(1), arg(2))?.to_ascii_lowercase();
            let Some(map) = caller.data_mut().map_mut(kind) else {
                return Ok(Status::BadArgument as i32);
            };
            map.retain(|(k, _)| *k != key);
            caller
                .data_mut()
                .note(|| format!("remove_header_map_value({kind}, {key})"));
            ok
        }
        "proxy_get_property" => {
            let path = read_path(caller, arg(0), arg(1))?;
            let value = caller.data().property(&path);
            give_lookup(
                caller,
                format!("get_property({path})"),
                value.as_deref(),
                arg(2),
                arg(3),
            )
        }
        "proxy_set_property" => {
            let path = read_path(caller, arg(0), arg(1))?;
            let value = read_str(caller, arg(2), arg(3))?;
            caller.data_mut().note(|| format!("set_property({path})"));
            // Envoy stores it as filter state `wasm.<path>`.
            caller
                .data_mut()
                .stream
                .filter_state
                .insert(format!("wasm.{path}"), value);
            ok
        }
        "proxy_get_shared_data" => {
            let key = read_str(caller, arg(0), arg(1))?;
            let entry = caller.data().shared.get(&key).cloned();
            let status = give_lookup(
                caller,
                format!("get_shared_data({key})"),
                entry.as_ref().map(|(v, _)| v.as_slice()),
                arg(2),
                arg(3),
            )?;
            if let Some((_, cas)) = entry {
                write_u32(caller, arg(4), cas)?;
            }
            Ok(status)
        }
        "proxy_set_shared_data" => {
            let key = read_str(caller, arg(0), arg(1))?;
            let value = read(caller, arg(2), arg(3))?;
            let cas = arg(4) as u32;
            let h = caller.data_mut();
            let status = match h.shared.get(&key) {
                Some((_, current)) if cas != 0 && cas != *current => Status::CasMismatch,
                existing => {
                    let next = existing.map(|(_, c)| c.wrapping_add(1)).unwrap_or(1);
                    h.shared.insert(key.clone(), (value, next));
                    Status::Ok
                }
            };
            h.note(|| format!("set_shared_data({key}, cas {cas}) -> {status:?}"));
            Ok(status as i32)
        }
        "proxy_register_shared_queue" => {
            let name = read_str(caller, arg(0), arg(1))?;
            let h = caller.data_mut();
            let id = match h.queues.iter().position(|(n, _)| *n == name) {
                Some(i) => i,
                None => {
                    h.queues.push((name, VecDeque::new()));
                    h.queues.len() - 1
                }
            };
            write_u32(caller, arg(2), id as u32 + 1)?;
            ok
        }
        "proxy_resolve_shared_queue" => {
            let name = read_str(caller, arg(2), arg(3))?;
            match caller.data().queues.iter().position(|(n, _)| *n == name) {
                Some(id) => {
                    write_u32(caller, arg(4), id as u32 + 1)?;
                    ok
                }
                None => Ok(Status::NotFound as i32),
            }
        }
        "proxy_dequeue_shared_queue" => {
            let id = (arg(0) as u32 as usize).wrapping_sub(1);
            let item = match caller.data_mut().queues.get_mut(id) {
                None => return Ok(Status::NotFound as i32),
                Some((_, q)) => q.pop_front(),
            };
            match item {
                Some(v) => {
                    give(caller, &v, arg(1), arg(2))?;
                    ok
                }
                None => Ok(Status::Empty as i32),
            }
        }
        "proxy_enqueue_shared_queue" => {
            let id = (arg(0) as u32 as usize).wrapping_sub(1);
            let v = read(caller, arg(1), arg(2))?;
            match caller.data_mut().queues.get_mut(id) {
                None => Ok(Status::NotFound as i32),
                Some((_, q)) => {
                    q.push_back(v);
                    ok
                }
            }
        }
        "proxy_continue_stream" => {
            let h = caller.data_mut();
            match arg(0) {
                0 => h.stream.resumed_request = true,
                1 => h.stream.resumed_response = true,
                other => return h.unmodelled(&format!("proxy_continue_stream({other})")),
            }
            h.note(|| format!("continue_stream({})", arg(0)));
            ok
        }
        "proxy_close_stream" => {
            let h = caller.data_mut();
            h.stream.reset = true;
            h.note(|| format!("close_stream({})", arg(0)));
            ok
        }
        "proxy_send_local_response" => {
            let status = arg(0) as u32;
            let details = read_str(caller, arg(1), arg(2))?;
            let body = read(caller, arg(3), arg(4))?;
            let headers = deserialize_pairs(&read(caller, arg(5), arg(6))?)?;
            let h = caller.data_mut();
            h.note(|| format!("send_local_response({status})"));
            h.stream.local_reply = Some(LocalReply {
                status,
                headers: headers
                    .into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect(),
                body,
                details,
            });
            ok
        }
        "proxy_http_call" => {
            let cluster = read_str(caller, arg(0), arg(1))?;
            let headers = deserialize_pairs(&read(caller, arg(2), arg(3))?)?;
            let body = read(caller, arg(4), arg(5))?;
            let timeout_ms = arg(8) as u32;
            let h = caller.data_mut();
            if !h.settings.clusters.contains(&cluster) {
                h.note(|| format!("http_call({cluster}) -> BadArgument (no such cluster)"));
                return Ok(Status::BadArgument as i32);
            }
            let token = h.next_token;
            h.next_token += 1;
            h.note(|| {
                format!(
                    "http_call({cluster}, {} body bytes, timeout {timeout_ms} ms) -> token {token}",
                    body.len()
                )
            });
            h.pending_calls.push_back((
                token,
                HttpCall {
                    cluster,
                    headers,
                    body,
                    timeout_ms,
                },
            ));
            write_u32(caller, arg(9), token)?;
            ok
        }
        "proxy_get_status" => caller.data_mut().unmodelled("proxy_get_status"),
        "proxy_set_effective_context" => {
            caller.data_mut().effective_context = arg(0) as u32;
            ok
        }
        "proxy_done" => ok,
        "proxy_define_metric" => {
            let kind = match arg(0) {
                0 => "counter",
                1 => "gauge",
                _ => "histogram",
            };
            let name = read_str(caller, arg(1), arg(2))?;
            let h = caller.data_mut();
            let id = match h.metrics.iter().position(|m| m.name == name) {
                Some(i) => i,
                None => {
                    h.metrics.push(Metric {
                        name,
                        kind,
                        value: 0,
                    });
                    h.metrics.len() - 1
                }
            };
            write_u32(caller, arg(3), id as u32)?;
            ok
        }
        "proxy_increment_metric" => {
            let id = arg(0) as u32 as usize;
            let by = a.get(1).map(i64v).unwrap_or(0);
            match caller.data_mut().metrics.get_mut(id) {
                Some(m) => {
                    m.value = m.value.saturating_add(by);
                    ok
                }
                None => Ok(Status::NotFound as i32),
            }
        }
        "proxy_record_metric" => {
            let id = arg(0) as u32 as usize;
            let v = a.get(1).map(i64v).unwrap_or(0);
            match caller.data_mut().metrics.get_mut(id) {
                Some(m) => {
                    m.value = v;
                    ok
                }
                None => Ok(Status::NotFound as i32),
            }
        }
        "proxy_get_metric" => {
            let id = arg(0) as u32 as usize;
            match caller.data().metrics.get(id).map(|m| m.value) {
                Some(v) => {
                    write_u64(caller, arg(1), v as u64)?;
                    ok
                }
                None => Ok(Status::NotFound as i32),
            }
        }
        "proxy_grpc_call"
        | "proxy_grpc_stream"
        | "proxy_grpc_send"
        | "proxy_grpc_cancel"
        | "proxy_grpc_close"
        | "proxy_call_foreign_function" => caller.data_mut().unmodelled(name),
        // WASI preview 1.
        "environ_sizes_get" => {
            let env = &caller.data().settings.env;
            let count = env.len() as u32;
            let size: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
            write_u32(caller, arg(0), count)?;
            write_u32(caller, arg(1), size as u32)?;
            ok
        }
        "environ_get" => {
            let env = caller.data().settings.env.clone();
            let (mut ptrs, mut buf) = (arg(0) as u32, arg(1) as u32);
            let m = mem(caller)?;
            for (k, v) in env {
                let entry = format!("{k}={v}\0");
                m.write(&mut *caller, buf as usize, entry.as_bytes())
                    .map_err(|_| anyhow!("environ_get: buffer out of bounds"))?;
                write_u32(caller, ptrs as i32, buf)?;
                ptrs += 4;
                buf += entry.len() as u32;
            }
            ok
        }
        "fd_write" => {
            // stdout/stderr of the module go to the log, as Envoy does.
            let (iovs, n, nwritten) = (arg(1), arg(2), arg(3));
            let mut total = 0u32;
            let mut text = Vec::new();
            for k in 0..n {
                let iov = read(caller, iovs + k * 8, 8)?;
                let p = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let l = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                text.extend(read(caller, p, l)?);
                total += l as u32;
            }
            let level = if arg(0) == 2 { "error" } else { "info" };
            caller.data_mut().logs.push(LogLine {
                level,
                message: String::from_utf8_lossy(&text).trim_end().to_string(),
            });
            write_u32(caller, nwritten, total)?;
            ok
        }
        "random_get" => {
            // Deterministic: replays must not depend on chance.
            let (p, l) = (arg(0), arg(1));
            let bytes: Vec<u8> = (0..l as u32)
                .map(|k| (k.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            let m = mem(caller)?;
            m.write(&mut *caller, p as u32 as usize, &bytes)
                .map_err(|_| anyhow!("random_get: buffer out of bounds"))?;
            ok
        }
        "clock_time_get" => {
            write_u64(caller, arg(2), now_nanos())?;
            ok
        }
        "proc_exit" => bail!("the module called proc_exit({})", arg(0)),
        other => bail!("no host function {other}"),
    }
}

/// A compiled filter module, ready to start VMs.
pub struct Plugin {
    engine: Engine,
    module: Module,
    linker: Linker<HostState>,
}

impl Plugin {
    /// Compiles the `.wasm` and checks its imports: each must be one this host provides.
    pub fn load(path: &Path) -> Result<Plugin> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let engine = Engine::default();
        let module = Module::new(&engine, &bytes).map_err(|e| {
            anyhow::Error::from(e).context(format!(
                "{} is not a valid WebAssembly module",
                path.display()
            ))
        })?;
        let mut linker = Linker::new(&engine);
        for import in module.imports() {
            let (m, n) = (import.module(), import.name());
            let known = (m == "env" && ENV_IMPORTS.contains(&n))
                || OTHER_IMPORTS.iter().any(|(om, on)| *om == m && *on == n);
            let ExternType::Func(ty) = import.ty() else {
                bail!("the module imports {m}.{n}, which is not a function; a proxy-wasm host provides only functions");
            };
            if !known {
                bail!("the module imports {m}.{n}, which is not part of the proxy-wasm ABI 0.2.1 or the WASI calls Envoy provides; Envoy would refuse to load it");
            }
            let name = n.to_string();
            let ty: FuncType = ty.clone();
            let returns_value = ty.results().len() == 1;
            linker.func_new(m, n, ty, move |mut caller, params, results| {
                let status = dispatch(&name, &mut caller, params)
                    .map_err(|e| wasmtime::Error::msg(format!("{e:#}")))?;
                if returns_value {
                    results[0] = Val::I32(status);
                }
                Ok(())
            })?;
        }
        Ok(Plugin {
            engine,
            module,
            linker,
        })
    }

    /// Starts a VM: `_initialize`, the root context, `on_vm_start`, `on_configure`.
    /// A configuration the plugin refuses is an error carrying the plugin's log.
    pub fn start(&self, settings: Settings, plugin_config: &[u8]) -> Result<Vm, StartError> {
        let mut store = Store::new(
            &self.engine,
            HostState::new(settings, plugin_config.to_vec()),
        );
        let instance = self
            .linker
            .instantiate(&mut store, &self.module)
            .map_err(|e| StartError::Load(format!("{e:#}")))?;
        let memory = match instance.get_export(&mut store, "memory") {
            Some(Extern::Memory(m)) => m,
            _ => return Err(StartError::Load("the module exports no memory".into())),
        };
        store.data_mut().memory = Some(memory);
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate")
            .or_else(|_| instance.get_typed_func::<i32, i32>(&mut store, "malloc"))
            .map_err(|_| {
                StartError::Load(
                    "the module exports neither proxy_on_memory_allocate nor malloc".into(),
                )
            })?;
        store.data_mut().alloc = Some(alloc);
        let mut vm = Vm::new(store, instance).map_err(|e| StartError::Load(format!("{e:#}")))?;
        vm.boot().map_err(|e| match e {
            BootError::Refused => StartError::Refused(vm.store.data().logs.clone()),
            BootError::Trap(t) => StartError::Load(t),
        })?;
        Ok(vm)
    }
}

/// Why a VM did not start.
#[derive(Debug)]
pub enum StartError {
    /// The module could not be instantiated or trapped while starting.
    Load(String),
    /// `on_vm_start` or `on_configure` returned false; the plugin's log says why.
    Refused(Vec<LogLine>),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Load(e) => write!(f, "the filter could not start: {e}"),
            StartError::Refused(logs) => {
                write!(f, "the filter refused its configuration")?;
                for l in logs {
                    write!(f, "\n  [{}] {}", l.level, l.message)?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for StartError {}

enum BootError {
    Refused,
    Trap(String),
}

struct Exports {
    initialize: Option<TypedFunc<(), ()>>,
    context_create: TypedFunc<(i32, i32), ()>,
    vm_start: TypedFunc<(i32, i32), i32>,
    configure: TypedFunc<(i32, i32), i32>,
    request_headers: TypedFunc<(i32, i32, i32), i32>,
    request_body: TypedFunc<(i32, i32, i32), i32>,
    request_trailers: TypedFunc<(i32, i32), i32>,
    response_headers: TypedFunc<(i32, i32, i32), i32>,
    response_body: TypedFunc<(i32, i32, i32), i32>,
    response_trailers: TypedFunc<(i32, i32), i32>,
    call_response: TypedFunc<(i32, i32, i32, i32, i32), ()>,
    done: TypedFunc<i32, i32>,
    log: TypedFunc<i32, ()>,
    delete: TypedFunc<i32, ()>,
}

/// A running VM with its root context.
pub struct Vm {
    store: Store<HostState>,
    x: Exports,
    root: u32,
    next_context: u32,
}

const ACTION_CONTINUE: i32 = 0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Request,
    Response,
}

impl Vm {
    fn new(mut store: Store<HostState>, inst: Instance) -> Result<Vm> {
        macro_rules! f {
            ($name:literal) => {
                inst.get_typed_func(&mut store, $name).map_err(|e| {
                    anyhow::Error::from(e).context(format!(
                        "the module does not export {} with the ABI 0.2.1 signature",
                        $name
                    ))
                })?
            };
        }
        let x = Exports {
            initialize: inst.get_typed_func(&mut store, "_initialize").ok(),
            context_create: f!("proxy_on_context_create"),
            vm_start: f!("proxy_on_vm_start"),
            configure: f!("proxy_on_configure"),
            request_headers: f!("proxy_on_request_headers"),
            request_body: f!("proxy_on_request_body"),
            request_trailers: f!("proxy_on_request_trailers"),
            response_headers: f!("proxy_on_response_headers"),
            response_body: f!("proxy_on_response_body"),
            response_trailers: f!("proxy_on_response_trailers"),
            call_response: f!("proxy_on_http_call_response"),
            done: f!("proxy_on_done"),
            log: f!("proxy_on_log"),
            delete: f!("proxy_on_delete"),
        };
        Ok(Vm {
            store,
            x,
            root: 1,
            next_context: 2,
        })
    }

    fn boot(&mut self) -> std::result::Result<(), BootError> {
        let trap = |e: wasmtime::Error| BootError::Trap(format!("{e:#}"));
        if let Some(init) = self.x.initialize.clone() {
            init.call(&mut self.store, ()).map_err(trap)?;
        }
        let root = self.root as i32;
        self.x
            .context_create
            .call(&mut self.store, (root, 0))
            .map_err(trap)?;
        if self
            .x
            .vm_start
            .call(&mut self.store, (root, 0))
            .map_err(trap)?
            == 0
        {
            return Err(BootError::Refused);
        }
        let size = self.store.data().plugin_config.len() as i32;
        if self
            .x
            .configure
            .call(&mut self.store, (root, size))
            .map_err(trap)?
            == 0
        {
            return Err(BootError::Refused);
        }
        Ok(())
    }

    /// Log lines written so far (start-up included).
    pub fn logs(&self) -> &[LogLine] {
        &self.store.data().logs
    }

    pub fn metrics(&self) -> &[Metric] {
        &self.store.data().metrics
    }

    /// Runs one exchange. `answer` is the outside world for the module's HTTP calls:
    /// `None` for a cluster Envoy would not know. After a trap the VM must not be used
    /// again: start a new one.
    pub fn run(
        &mut self,
        input: &ExchangeInput,
        answer: &mut dyn FnMut(&HttpCall) -> Option<CallAnswer>,
    ) -> ExchangeOutput {
        let ctx = self.next_context;
        self.next_context += 1;
        {
            let h = self.store.data_mut();
            h.logs.clear();
            h.trace.clear();
            h.calls.clear();
            h.pending_calls.clear();
            h.violation = None;
            h.stream = StreamState {
                context_id: ctx,
                properties: input.properties.clone(),
                ..StreamState::default()
            };
        }
        let mut out = ExchangeOutput {
            request: Fate::NotReached,
            response: Fate::NotReached,
            client: None,
            logs: Vec::new(),
            filter_state: BTreeMap::new(),
            http_calls: Vec::new(),
            trace: Vec::new(),
            trap: None,
        };
        // Envoy's connection manager reads the path before any filter.
        let raw_path = input
            .request_headers
            .iter()
            .find(|(k, _)| k == ":path")
            .map(|(_, v)| v.clone());
        let seen = match &raw_path {
            Some(p) if self.store.data().settings.path_hygiene => {
                crate::envoy_path::normalize(p).map(Some)
            }
            Some(p) => match crate::envoy_path::refusal(p) {
                Some(why) => Err(why),
                None => Ok(None),
            },
            None => Ok(None),
        };
        let normalized;
        let input = match seen {
            Err(why) => {
                out.request = Fate::EnvoyRefused {
                    status: 400,
                    reason: why.to_string(),
                };
                out.client = Some(status_only(400));
                return out;
            }
            Ok(Some(p)) if Some(&p) != raw_path.as_ref() => {
                normalized = with_path(input, &p);
                &normalized
            }
            Ok(_) => input,
        };
        let result = self.drive(ctx, input, answer, &mut out);
        if let Err(e) = result {
            let violation = self.store.data_mut().violation.take();
            out.trap = Some(violation.unwrap_or_else(|| format!("{e:#}")));
            // Envoy with failure_policy FAIL_CLOSED answers 503 for a VM that failed.
            out.client = Some(Delivered {
                headers: vec![(":status".into(), "503".into())],
                body: Vec::new(),
                trailers: Vec::new(),
            });
        }
        let h = self.store.data_mut();
        out.logs = std::mem::take(&mut h.logs);
        out.trace = std::mem::take(&mut h.trace);
        out.http_calls = std::mem::take(&mut h.calls);
        out.filter_state = std::mem::take(&mut h.stream.filter_state);
        out
    }

    fn drive(
        &mut self,
        ctx: u32,
        input: &ExchangeInput,
        answer: &mut dyn FnMut(&HttpCall) -> Option<CallAnswer>,
        out: &mut ExchangeOutput,
    ) -> Result<()> {
        let c = ctx as i32;
        self.x
            .context_create
            .call(&mut self.store, (c, self.root as i32))?;
        out.request = self.direction(
            Dir::Request,
            c,
            &input.request_headers,
            &input.request_body,
            &input.request_trailers,
            answer,
        )?;
        match &out.request {
            Fate::Forwarded(_) => match &input.response {
                Some(r) => {
                    out.response =
                        self.direction(Dir::Response, c, &r.headers, &r.body, &r.trailers, answer)?;
                    out.client = match &out.response {
                        Fate::Forwarded(d) => Some(d.clone()),
                        Fate::Replied(r) => Some(reply_as_delivered(r)),
                        Fate::EnvoyRefused { status, .. } => Some(status_only(*status)),
                        Fate::Stalled { .. } | Fate::NotReached => None,
                    };
                }
                None => out.client = Some(status_only(503)),
            },
            Fate::Replied(r) => {
                // A local reply goes through the response callbacks, as in Envoy.
                let reply = reply_as_delivered(r);
                let fate =
                    self.direction(Dir::Response, c, &reply.headers, &reply.body, &[], answer)?;
                out.client = Some(match fate {
                    Fate::Forwarded(d) => d,
                    _ => reply,
                });
            }
            Fate::EnvoyRefused { status, .. } => out.client = Some(status_only(*status)),
            Fate::Stalled { .. } | Fate::NotReached => {}
        }
        let done = self.x.done.call(&mut self.store, c)?;
        let _ = done;
        self.x.log.call(&mut self.store, c)?;
        self.x.delete.call(&mut self.store, c)?;
        Ok(())
    }

    /// Answers every HTTP call dispatched so far, each through `on_http_call_response`.
    fn settle(
        &mut self,
        ctx: i32,
        answer: &mut dyn FnMut(&HttpCall) -> Option<CallAnswer>,
    ) -> Result<()> {
        // A callback may dispatch another call; bound the chain.
        for _ in 0..64 {
            let Some((token, call)) = self.store.data_mut().pending_calls.pop_front() else {
                return Ok(());
            };
            let reply = answer(&call);
            self.store.data_mut().calls.push(call);
            let (headers, body) = match reply {
                None | Some(CallAnswer::Failure) => (Vec::new(), Vec::new()),
                Some(CallAnswer::Response { headers, body }) => (headers, body),
            };
            let (nh, nb) = (headers.len() as i32, body.len() as i32);
            self.store.data_mut().call_response = Some(CallState { headers, body });
            self.store.data_mut().effective_context = ctx as u32;
            let r = self
                .x
                .call_response
                .call(&mut self.store, (ctx, token as i32, nh, nb, 0));
            self.store.data_mut().call_response = None;
            r?;
        }
        bail!("the module dispatched more than 64 chained HTTP calls in one exchange")
    }

    fn take_reply(&mut self) -> Option<LocalReply> {
        self.store.data_mut().stream.local_reply.take()
    }

    fn resumed(&mut self, d: Dir) -> bool {
        let s = &mut self.store.data_mut().stream;
        let r = match d {
            Dir::Request => &mut s.resumed_request,
            Dir::Response => &mut s.resumed_response,
        };
        std::mem::take(r)
    }

    /// Runs one direction through headers, body chunks and trailers.
    #[allow(clippy::too_many_arguments)]
    fn direction(
        &mut self,
        d: Dir,
        c: i32,
        headers: &[(String, String)],
        body: &[u8],
        trailers: &[(String, String)],
        answer: &mut dyn FnMut(&HttpCall) -> Option<CallAnswer>,
    ) -> Result<Fate> {
        let lower = |m: &[(String, String)]| -> Vec<(String, String)> {
            m.iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect()
        };
        {
            let s = &mut self.store.data_mut().stream;
            match d {
                Dir::Request => {
                    s.request_headers = lower(headers);
                    s.request_trailers = lower(trailers);
                    s.request_body.clear();
                }
                Dir::Response => {
                    s.in_response = true;
                    s.response_headers = lower(headers);
                    s.response_trailers = lower(trailers);
                    s.response_body.clear();
                }
            }
        }
        let headers_eos = body.is_empty() && trailers.is_empty();
        let n = headers.len() as i32;
        let (on_headers, on_body, on_trailers) = match d {
            Dir::Request => (
                self.x.request_headers.clone(),
                self.x.request_body.clone(),
                self.x.request_trailers.clone(),
            ),
            Dir::Response => (
                self.x.response_headers.clone(),
                self.x.response_body.clone(),
                self.x.response_trailers.clone(),
            ),
        };
        let action = on_headers.call(&mut self.store, (c, n, i32::from(headers_eos)))?;
        self.settle(c, answer)?;
        if let Some(r) = self.take_reply() {
            return Ok(Fate::Replied(r));
        }
        if action != ACTION_CONTINUE && !self.resumed(d) {
            return Ok(Fate::Stalled {
                at: "headers".into(),
            });
        }
        let mut forwarded: Vec<u8> = Vec::new();
        let chunk = match self.store.data().settings.chunk_size {
            0 => body.len().max(1),
            n => n,
        };
        let limit = self.store.data().settings.buffer_limit;
        let chunks: Vec<&[u8]> = if body.is_empty() {
            Vec::new()
        } else {
            body.chunks(chunk).collect()
        };
        let last = chunks.len();
        let mut paused = false;
        for (k, part) in chunks.into_iter().enumerate() {
            let eos = k + 1 == last && trailers.is_empty();
            let buffered = {
                let s = &mut self.store.data_mut().stream;
                let buf = match d {
                    Dir::Request => &mut s.request_body,
                    Dir::Response => &mut s.response_body,
                };
                buf.extend_from_slice(part);
                buf.len()
            };
            if buffered > limit {
                return Ok(Fate::EnvoyRefused {
                    status: if d == Dir::Request { 413 } else { 500 },
                    reason: format!("the buffered body ({buffered} bytes) went over Envoy's buffer limit of {limit} bytes"),
                });
            }
            let action = on_body.call(&mut self.store, (c, buffered as i32, i32::from(eos)))?;
            self.settle(c, answer)?;
            if let Some(r) = self.take_reply() {
                return Ok(Fate::Replied(r));
            }
            paused = action != ACTION_CONTINUE && !self.resumed(d);
            if !paused {
                forwarded.extend(self.take_body(d));
            }
        }
        if !trailers.is_empty() {
            let action = on_trailers.call(&mut self.store, (c, trailers.len() as i32))?;
            self.settle(c, answer)?;
            if let Some(r) = self.take_reply() {
                return Ok(Fate::Replied(r));
            }
            paused = action != ACTION_CONTINUE && !self.resumed(d);
            if !paused {
                forwarded.extend(self.take_body(d));
            }
        }
        if paused {
            return Ok(Fate::Stalled {
                at: "end of the body".into(),
            });
        }
        let s = &self.store.data().stream;
        let (h, t) = match d {
            Dir::Request => (s.request_headers.clone(), s.request_trailers.clone()),
            Dir::Response => (s.response_headers.clone(), s.response_trailers.clone()),
        };
        Ok(Fate::Forwarded(Delivered {
            headers: h,
            body: forwarded,
            trailers: t,
        }))
    }

    fn take_body(&mut self, d: Dir) -> Vec<u8> {
        let s = &mut self.store.data_mut().stream;
        match d {
            Dir::Request => std::mem::take(&mut s.request_body),
            Dir::Response => std::mem::take(&mut s.response_body),
        }
    }
}

fn reply_as_delivered(r: &LocalReply) -> Delivered {
    let mut headers = vec![(":status".to_string(), r.status.to_string())];
    headers.extend(r.headers.iter().cloned());
    Delivered {
        headers,
        body: r.body.clone(),
        trailers: Vec::new(),
    }
}

fn status_only(status: u32) -> Delivered {
    Delivered {
        headers: vec![(":status".into(), status.to_string())],
        body: Vec::new(),
        trailers: Vec::new(),
    }
}

/// `input` with its request path replaced, in the `:path` header and in the
/// `request.path` / `request.url_path` properties, as Envoy's normalisation replaces it.
fn with_path(input: &ExchangeInput, path: &str) -> ExchangeInput {
    let mut x = input.clone();
    for (k, v) in &mut x.request_headers {
        if k == ":path" {
            *v = path.to_string();
        }
    }
    if x.properties.contains_key("request.path") {
        x.properties
            .insert("request.path".into(), path.as_bytes().to_vec());
    }
    if x.properties.contains_key("request.url_path") {
        let url_path = path.split('?').next().unwrap_or(path);
        x.properties
            .insert("request.url_path".into(), url_path.as_bytes().to_vec());
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_maps_round_trip() {
        let pairs = vec![
            ("a".to_string(), "1".to_string()),
            (":path".to_string(), "/x".to_string()),
        ];
        assert_eq!(deserialize_pairs(&serialize_pairs(&pairs)).unwrap(), pairs);
        assert!(deserialize_pairs(&[5, 0, 0, 0]).is_err());
        assert!(deserialize_pairs(&[]).unwrap().is_empty());
    }
}
