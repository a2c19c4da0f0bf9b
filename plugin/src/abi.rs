//! The host calls the filter makes, declared against the proxy-wasm ABI 0.2.1 directly.
//!
//! The SDK's `hostcalls` wrappers return `Result`, but most of them `panic!` on any status
//! they do not expect (a host answering `BadArgument` where the SDK expects `Ok`, say),
//! and a panic traps the whole VM: every stream on that worker fails with it. These
//! wrappers turn every status into an `Err` instead, so the filter decides what a
//! failure means (for a covered message: refuse it). HTTP calls still go through the
//! SDK, whose dispatcher must learn each call's token to route its answer back.

use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};
use std::ptr::null_mut;

/// A status other than `Ok` from the host (proxy-wasm `WasmResult`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError(pub u32);

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, data: *const u8, size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(ret: *mut u64) -> u32;
    fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        ret: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(path: *const u8, path_size: usize, data: *const u8, size: usize) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, ret_id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_get_buffer_bytes(
        kind: u32,
        start: usize,
        max: usize,
        ret: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        kind: u32,
        start: usize,
        size: usize,
        data: *const u8,
        data_size: usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(kind: u32, ret: *mut *mut u8, ret_size: *mut usize) -> u32;
    fn proxy_get_header_map_value(
        kind: u32,
        key: *const u8,
        key_size: usize,
        ret: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        kind: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        kind: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(kind: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
    fn proxy_close_stream(stream: u32) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        ret: *mut *mut u8,
        ret_size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        data: *const u8,
        size: usize,
        cas: u32,
    ) -> u32;
}

fn check(status: u32) -> Result<(), HostError> {
    if status == OK {
        Ok(())
    } else {
        Err(HostError(status))
    }
}

/// Takes ownership of memory the host allocated through `proxy_on_memory_allocate`.
///
/// # Safety
/// `ptr` and `size` must be what the host returned for a successful call.
unsafe fn owned(ptr: *mut u8, size: usize) -> Option<Vec<u8>> {
    if ptr.is_null() {
        None
    } else {
        // The host wrote `size` bytes into a buffer of exactly that capacity, allocated
        // by this module's allocator.
        Some(Vec::from_raw_parts(ptr, size, size))
    }
}

/// Calls a host function that returns a buffer; `NotFound` and a null buffer are `None`.
fn fetch(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Result<Option<Vec<u8>>, HostError> {
    let mut ptr: *mut u8 = null_mut();
    let mut size: usize = 0;
    match call(&mut ptr, &mut size) {
        OK => Ok(unsafe { owned(ptr, size) }),
        NOT_FOUND => Ok(None),
        other => Err(HostError(other)),
    }
}

/// Reads a proxy-wasm serialised header map; malformed data is an error, not a panic.
fn pairs(data: &[u8]) -> Result<Vec<(String, String)>, HostError> {
    const BAD: HostError = HostError(u32::MAX);
    let word = |at: usize| -> Result<usize, HostError> {
        let b = data.get(at..at + 4).ok_or(BAD)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let n = word(0)?;
    let mut pos = 4usize
        .checked_add(n.checked_mul(8).ok_or(BAD)?)
        .ok_or(BAD)?;
    let mut out = Vec::with_capacity(n.min(1024));
    for i in 0..n {
        let (kl, vl) = (word(4 + i * 8)?, word(8 + i * 8)?);
        let k = data.get(pos..pos + kl).ok_or(BAD)?;
        pos += kl + 1;
        let v = data.get(pos..pos + vl).ok_or(BAD)?;
        pos += vl + 1;
        out.push((
            String::from_utf8_lossy(k).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        ));
    }
    Ok(out)
}

fn serialize_pairs(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (k, v) in headers {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

pub fn log(level: LogLevel, msg: &str) -> Result<(), HostError> {
    check(unsafe { proxy_log(level as u32, msg.as_ptr(), msg.len()) })
}

pub fn current_time_nanos() -> Result<u64, HostError> {
    let mut t = 0u64;
    check(unsafe { proxy_get_current_time_nanoseconds(&mut t) })?;
    Ok(t)
}

fn path_bytes(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

pub fn get_property(path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
    let p = path_bytes(path);
    fetch(|ret, size| unsafe { proxy_get_property(p.as_ptr(), p.len(), ret, size) })
}

pub fn set_property(path: &[&str], value: &[u8]) -> Result<(), HostError> {
    let p = path_bytes(path);
    check(unsafe { proxy_set_property(p.as_ptr(), p.len(), value.as_ptr(), value.len()) })
}

pub fn define_metric(kind: MetricType, name: &str) -> Result<u32, HostError> {
    let mut id = 0u32;
    check(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment_metric(id: u32, by: i64) -> Result<(), HostError> {
    check(unsafe { proxy_increment_metric(id, by) })
}

pub fn get_buffer(
    kind: BufferType,
    start: usize,
    max: usize,
) -> Result<Option<Vec<u8>>, HostError> {
    fetch(|ret, size| unsafe { proxy_get_buffer_bytes(kind as u32, start, max, ret, size) })
}

pub fn set_buffer(
    kind: BufferType,
    start: usize,
    size: usize,
    data: &[u8],
) -> Result<(), HostError> {
    check(unsafe { proxy_set_buffer_bytes(kind as u32, start, size, data.as_ptr(), data.len()) })
}

pub fn get_map(kind: MapType) -> Result<Vec<(String, String)>, HostError> {
    match fetch(|ret, size| unsafe { proxy_get_header_map_pairs(kind as u32, ret, size) })? {
        Some(data) => pairs(&data),
        None => Ok(Vec::new()),
    }
}

pub fn get_map_value(kind: MapType, key: &str) -> Result<Option<String>, HostError> {
    let v = fetch(|ret, size| unsafe {
        proxy_get_header_map_value(kind as u32, key.as_ptr(), key.len(), ret, size)
    })?;
    Ok(v.map(|b| String::from_utf8_lossy(&b).into_owned()))
}

pub fn replace_map_value(kind: MapType, key: &str, value: &str) -> Result<(), HostError> {
    check(unsafe {
        proxy_replace_header_map_value(
            kind as u32,
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

pub fn add_map_value(kind: MapType, key: &str, value: &str) -> Result<(), HostError> {
    check(unsafe {
        proxy_add_header_map_value(
            kind as u32,
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

pub fn remove_map_value(kind: MapType, key: &str) -> Result<(), HostError> {
    check(unsafe { proxy_remove_header_map_value(kind as u32, key.as_ptr(), key.len()) })
}

pub fn send_local_response(
    status: u32,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(), HostError> {
    let h = serialize_pairs(headers);
    let details = "consentry";
    check(unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            h.as_ptr(),
            h.len(),
            -1,
        )
    })
}

/// Stream types of `proxy_continue_stream` / `proxy_close_stream`.
pub const STREAM_REQUEST: u32 = 0;
pub const STREAM_RESPONSE: u32 = 1;

pub fn continue_stream(stream: u32) -> Result<(), HostError> {
    check(unsafe { proxy_continue_stream(stream) })
}

pub fn close_stream(stream: u32) -> Result<(), HostError> {
    check(unsafe { proxy_close_stream(stream) })
}

pub fn get_shared_data(key: &str) -> Result<Option<Vec<u8>>, HostError> {
    let mut cas = 0u32;
    fetch(|ret, size| unsafe {
        proxy_get_shared_data(key.as_ptr(), key.len(), ret, size, &mut cas)
    })
}

pub fn set_shared_data(key: &str, value: &[u8]) -> Result<(), HostError> {
    check(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), 0) })
}
