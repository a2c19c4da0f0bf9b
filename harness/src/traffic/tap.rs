//! Envoy HTTP tap output (`envoy.filters.http.tap`), as written by the tap's file sink
//! in a JSON format (`JSON_BODY_AS_BYTES` or `JSON_BODY_AS_STRING`).
//!
//! A file holds one `envoy.data.tap.v3.TraceWrapper` with an `http_buffered_trace`
//! (what `file_per_tap` writes), or several of them: as a JSON array, or as JSON objects
//! one after the other (what a streaming sink writes). YAML with the same shape is read too.
//!
//! ```json
//! {"http_buffered_trace": {
//!   "request":  {"headers": [{"key": ":method", "value": "POST"}, ...],
//!                "body": {"as_bytes": "<base64>", "truncated": false},
//!                "trailers": [...], "headers_received_time": "..."},
//!   "response": {"headers": [{"key": ":status", "value": "200"}, ...],
//!                "body": {"as_string": "...", "truncated": true}},
//!   "downstream_connection": {...}, "upstream_connection": {...}}}
//! ```
//!
//! - Field names may be written as in the proto (`as_bytes`) or in proto3 JSON's
//!   lowerCamelCase (`asBytes`). Fields this reader does not use (timestamps,
//!   connections) are ignored.
//! - A header is `{key, value}`, or `{key, raw_value}` with base64 bytes. Names are
//!   lower-cased. A request needs `:method` and `:path`; `:authority` falls back to `host`.
//! - A body is `as_bytes` (base64) or `as_string`; none means empty. A body marked
//!   `truncated` is replayed as recorded (cut short) with a warning: raise the tap's
//!   `max_buffered_rx_bytes` (request) / `max_buffered_tx_bytes` (response), 1 KiB by
//!   default.
//! - A trace without response headers has no response (the upstream never answered).
//! - `http_streamed_trace_segment` is refused: configure the tap for buffered traces.
//!
//! A tap trace knows neither the upstream cluster nor the caller's mTLS identity, so
//! `cluster` and `peer_principal` are `None`, and the consent store is the default one.
//! `source` is the file name, or `FILE#N` (N from 0) when a file holds several traces.

use super::native::{decode_base64, Doc};
use super::{Message, Recording, TrafficError};
use crate::yamlpos::{self, Positions};
use serde_json::{Map, Value};
use std::path::Path;

/// Reads one tap output file (one trace, a JSON array of traces, or concatenated traces).
pub fn load(file: &str, text: &str) -> Result<Vec<Recording>, TrafficError> {
    let docs = parse_docs(file, text)?;
    // (trace value, pointer of the trace inside its document, positions)
    let mut traces: Vec<(&Value, String, &Positions)> = Vec::new();
    for (value, pos) in &docs {
        match value {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    traces.push((item, format!("/{i}"), pos));
                }
            }
            other => traces.push((other, String::new(), pos)),
        }
    }
    if traces.is_empty() {
        return Err(TrafficError {
            file: file.to_string(),
            location: None,
            message: "holds no tap trace: expected {\"http_buffered_trace\": {...}}".into(),
        });
    }
    let many = traces.len() > 1 || docs.len() > 1 || docs.iter().any(|(v, _)| v.is_array());
    traces
        .into_iter()
        .enumerate()
        .map(|(i, (value, ptr, pos))| {
            let source = if many {
                format!("{file}#{i}")
            } else {
                file.to_string()
            };
            trace(&Doc { file, pos }, value, &ptr, source)
        })
        .collect()
}

/// Reads the traces of a `file_per_tap` directory: every `*.json`, `*.yaml` and `*.yml`
/// file, in name order (digit runs compared as numbers, so `tap_9` precedes `tap_10`).
pub fn load_dir(dir: &Path) -> Result<Vec<Recording>, TrafficError> {
    let dir_name = dir.display().to_string();
    let fail = |message: String| TrafficError {
        file: dir_name.clone(),
        location: None,
        message,
    };
    let entries =
        std::fs::read_dir(dir).map_err(|e| fail(format!("cannot read the directory: {e}")))?;
    let mut files = Vec::new();
    let mut protobuf = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| fail(format!("cannot read the directory: {e}")))?;
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        match path.extension().and_then(|e| e.to_str()) {
            Some("json" | "yaml" | "yml") => files.push((name, path)),
            Some("pb" | "pb_text") => protobuf.push(name),
            _ => {}
        }
    }
    if let Some(name) = protobuf.first() {
        return Err(fail(format!(
            "{name} is protobuf tap output, which this tool does not read; configure the tap's \
             output sink with format JSON_BODY_AS_BYTES or JSON_BODY_AS_STRING"
        )));
    }
    if files.is_empty() {
        return Err(fail(
            "holds no tap files (*.json); point the tap's file_per_tap path_prefix into this directory"
                .into(),
        ));
    }
    files.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    let mut out = Vec::new();
    for (_, path) in files {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| TrafficError {
            file: file.clone(),
            location: None,
            message: format!("cannot read it: {e}"),
        })?;
        out.extend(load(&file, &text)?);
    }
    Ok(out)
}

fn parse_docs(file: &str, text: &str) -> Result<Vec<(Value, Positions)>, TrafficError> {
    let to_err = |e: yamlpos::YamlError| TrafficError {
        file: file.to_string(),
        location: Some(format!("{}:{}", e.line, e.column)),
        message: e.message,
    };
    let body = text.strip_prefix('\u{feff}').unwrap_or(text);
    if matches!(body.trim_start().chars().next(), Some('{' | '[')) {
        match yamlpos::parse_json_stream(body) {
            Ok(docs) => Ok(docs),
            // Not JSON: maybe YAML flow style; else the JSON error is the useful one.
            Err(json_err) => yamlpos::parse(body)
                .map(|d| vec![d])
                .map_err(|_| to_err(json_err)),
        }
    } else {
        yamlpos::parse(body).map(|d| vec![d]).map_err(to_err)
    }
}

/// Looks a field up by its proto name or its lowerCamelCase JSON name.
fn field<'v>(map: &'v Map<String, Value>, name: &str) -> Option<(&'v Value, String)> {
    if let Some(v) = map.get(name) {
        return Some((v, name.to_string()));
    }
    let camel = camel_case(name);
    map.get(&camel).map(|v| (v, camel))
}

fn camel_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn trace(d: &Doc<'_>, v: &Value, ptr: &str, source: String) -> Result<Recording, TrafficError> {
    let Value::Object(map) = v else {
        return Err(d.type_err(v, ptr, "a tap trace ({\"http_buffered_trace\": {...}})"));
    };
    if let Some((_, name)) = field(map, "http_streamed_trace_segment") {
        return Err(d.key_err(
            &yamlpos::join(ptr, &name),
            "streamed traces are not supported: configure the tap with http_buffered_trace \
             (do not set streaming in the tap's output_config)",
        ));
    }
    for socket in ["socket_buffered_trace", "socket_streamed_trace_segment"] {
        if let Some((_, name)) = field(map, socket) {
            return Err(d.key_err(
                &yamlpos::join(ptr, &name),
                "a transport socket tap is not an HTTP trace; record with the HTTP tap filter \
                 (envoy.filters.http.tap)",
            ));
        }
    }
    let (buffered, bptr) = match field(map, "http_buffered_trace") {
        Some((b, name)) => (b, yamlpos::join(ptr, &name)),
        // A bare HttpBufferedTrace, without the TraceWrapper around it.
        None if map.contains_key("request") => (v, ptr.to_string()),
        None => {
            let keys: Vec<&str> = map.keys().map(String::as_str).collect();
            return Err(d.err(
                ptr,
                format!(
                    "not an Envoy HTTP tap trace: expected the key `http_buffered_trace`, found {}",
                    if keys.is_empty() {
                        "no keys".to_string()
                    } else {
                        format!("`{}`", keys.join("`, `"))
                    }
                ),
            ));
        }
    };
    let Value::Object(bmap) = buffered else {
        return Err(d.type_err(buffered, &bptr, "a mapping with `request` and `response`"));
    };
    let mut warnings = Vec::new();
    let Some((req, req_name)) = field(bmap, "request") else {
        return Err(d.err(&bptr, "the trace has no `request`"));
    };
    let req_ptr = yamlpos::join(&bptr, &req_name);
    let mut request = message(d, req, &req_ptr, "request", &mut warnings)?;
    if request.header(":authority").is_none() {
        if let Some(host) = request.header("host").map(str::to_string) {
            request.headers.push((":authority".into(), host));
        }
    }
    for pseudo in [":method", ":path", ":authority"] {
        if request.header(pseudo).is_none() {
            return Err(d.err(
                &req_ptr,
                format!("the request has no `{pseudo}` header; a tap trace of an HTTP request always has one: is this the right file?"),
            ));
        }
    }
    let response = match field(bmap, "response") {
        None | Some((Value::Null, _)) => None,
        Some((resp, name)) => {
            let rptr = yamlpos::join(&bptr, &name);
            let m = message(d, resp, &rptr, "response", &mut warnings)?;
            if m.headers.is_empty() && m.body.is_empty() {
                None
            } else if m.header(":status").is_none() {
                return Err(d.err(&rptr, "the response has no `:status` header"));
            } else {
                Some(m)
            }
        }
    };
    Ok(Recording {
        source,
        request,
        response,
        warnings,
        ..Recording::default()
    })
}

fn message(
    d: &Doc<'_>,
    v: &Value,
    ptr: &str,
    what: &str,
    warnings: &mut Vec<String>,
) -> Result<Message, TrafficError> {
    let Value::Object(map) = v else {
        return Err(d.type_err(v, ptr, "a mapping with `headers` and `body`"));
    };
    let mut out = Message::default();
    if let Some((h, name)) = field(map, "headers") {
        out.headers = header_list(d, h, &yamlpos::join(ptr, &name))?;
    }
    if let Some((t, name)) = field(map, "trailers") {
        out.trailers = header_list(d, t, &yamlpos::join(ptr, &name))?;
    }
    if let Some((b, name)) = field(map, "body") {
        let bptr = yamlpos::join(ptr, &name);
        let Value::Object(body) = b else {
            return Err(d.type_err(
                b,
                &bptr,
                "a body ({\"as_bytes\": ...} or {\"as_string\": ...})",
            ));
        };
        let bytes = field(body, "as_bytes");
        let string = field(body, "as_string");
        out.body = match (bytes, string) {
            (Some(_), Some((_, name))) => {
                return Err(d.key_err(
                    &yamlpos::join(&bptr, &name),
                    "a body has `as_bytes` or `as_string`, not both",
                ))
            }
            (Some((v, name)), None) => {
                let p = yamlpos::join(&bptr, &name);
                let s = d.string(v, &p)?;
                decode_base64(s)
                    .map_err(|e| d.err(&p, format!("`as_bytes` is not valid base64 ({e})")))?
            }
            (None, Some((v, name))) => d
                .string(v, &yamlpos::join(&bptr, &name))?
                .as_bytes()
                .to_vec(),
            (None, None) => Vec::new(),
        };
        if let Some((t, name)) = field(body, "truncated") {
            let tp = yamlpos::join(&bptr, &name);
            out.body_truncated = t
                .as_bool()
                .ok_or_else(|| d.type_err(t, &tp, "true or false"))?;
        }
        if out.body_truncated {
            let limit = if what == "request" {
                "max_buffered_rx_bytes"
            } else {
                "max_buffered_tx_bytes"
            };
            warnings.push(format!(
                "the {what} body was truncated by the tap after {} bytes: it is replayed cut short, \
                 so a JSON body will likely be judged malformed; raise the tap's {limit} \
                 (1024 by default) and record again",
                out.body.len()
            ));
        }
    }
    Ok(out)
}

fn header_list(d: &Doc<'_>, v: &Value, ptr: &str) -> Result<Vec<(String, String)>, TrafficError> {
    let Value::Array(items) = v else {
        return Err(d.type_err(v, ptr, "a list of {\"key\": ..., \"value\": ...}"));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let p = format!("{ptr}/{i}");
        let Value::Object(h) = item else {
            return Err(d.type_err(item, &p, "a header {\"key\": ..., \"value\": ...}"));
        };
        let Some(key) = h.get("key") else {
            return Err(d.err(&p, "the header has no `key`"));
        };
        let key = d.string(key, &yamlpos::join(&p, "key"))?;
        if key.is_empty() {
            return Err(d.err(&yamlpos::join(&p, "key"), "the header name is empty"));
        }
        let value = match (h.get("value"), field(h, "raw_value")) {
            (Some(Value::String(s)), _) if !s.is_empty() => s.clone(),
            (_, Some((raw, name))) => {
                let rp = yamlpos::join(&p, &name);
                let bytes = decode_base64(d.string(raw, &rp)?)
                    .map_err(|e| d.err(&rp, format!("`raw_value` is not valid base64 ({e})")))?;
                String::from_utf8(bytes).map_err(|_| {
                    d.err(
                        &rp,
                        "the header value is not UTF-8, which the harness cannot replay",
                    )
                })?
            }
            (Some(v), None) => d.string(v, &yamlpos::join(&p, "value"))?.to_string(),
            (None, None) => String::new(),
        };
        out.push((key.to_ascii_lowercase(), value));
    }
    Ok(out)
}

/// Orders names with digit runs compared by value: `tap_9.json` < `tap_10.json`.
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (&a[..na], &b[..nb]);
                let ta = trim_zeros(da);
                let tb = trim_zeros(db);
                let ord = ta
                    .len()
                    .cmp(&tb.len())
                    .then_with(|| ta.cmp(tb))
                    .then_with(|| na.cmp(&nb));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|c| **c == b'0').count();
    &d[n..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        let candidates = [
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/traffic/tap"),
            Path::new(file!())
                .parent()
                .unwrap_or(Path::new("."))
                .join("../../../tests/traffic/tap"),
        ];
        candidates
            .into_iter()
            .find(|p| p.is_dir())
            .expect("tests/traffic/tap")
    }

    fn scratch_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("consentry-tap-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn err(text: &str) -> TrafficError {
        load("t.json", text).unwrap_err()
    }

    const ONE: &str = r#"{"http_buffered_trace": {"request": {"headers": [
        {"key": ":method", "value": "GET"}, {"key": ":path", "value": "/v1/customers"},
        {"key": ":authority", "value": "profile.acme.internal"}]}}}"#;

    #[test]
    fn file_per_tap_directory() {
        let dir = fixtures();
        let recs = load_dir(&dir).unwrap();
        assert_eq!(recs.len(), 3);
        let ends: Vec<_> = recs
            .iter()
            .map(|r| r.source.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(ends, ["tap_1.json", "tap_2.json", "tap_10.json"]);

        // as_bytes
        let r = &recs[0];
        assert_eq!(r.request.header(":method"), Some("POST"));
        assert_eq!(
            r.request.header(":authority"),
            Some("analytics.acme.internal")
        );
        let body: Value = serde_json::from_slice(&r.request.body).unwrap();
        assert_eq!(body["customers"][1]["id"], "c-1004");
        assert_eq!(
            r.request.header("content-length"),
            Some(r.request.body.len().to_string().as_str())
        );
        let resp = r.response.as_ref().unwrap();
        assert_eq!(resp.header(":status"), Some("202"));
        assert_eq!(resp.body, br#"{"accepted":2}"#);
        assert!(r.warnings.is_empty() && !r.request.body_truncated);
        assert!(r.cluster.is_none() && r.peer_principal.is_none() && r.expect.is_none());

        // as_string, no request body
        let r = &recs[1];
        assert!(r.request.body.is_empty());
        assert_eq!(r.request.header("x-consentry-caller"), Some("support"));
        let resp = r.response.as_ref().unwrap();
        let body: Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(body["customers"][0]["consents"]["marketing_email"], true);

        // truncated
        let r = &recs[2];
        assert!(r.request.body_truncated);
        assert_eq!(r.request.body.len(), 64);
        assert_eq!(r.warnings.len(), 1);
        assert!(
            r.warnings[0].contains("max_buffered_rx_bytes"),
            "{:?}",
            r.warnings
        );
        assert!(!r.response.as_ref().unwrap().body_truncated);
    }

    #[test]
    fn several_traces_in_one_file() {
        let concatenated = format!("{ONE}\n{ONE}");
        let recs = load("s.json", &concatenated).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].source, "s.json#0");
        assert_eq!(recs[1].source, "s.json#1");
        assert!(recs[0].response.is_none());
        let array = format!("[{ONE}, {ONE}, {ONE}]");
        let recs = load("a.json", &array).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[2].source, "a.json#2");
        let recs = load("o.json", ONE).unwrap();
        assert_eq!(recs[0].source, "o.json");
    }

    #[test]
    fn camel_case_raw_values_and_yaml() {
        let text = r#"{"httpBufferedTrace": {
            "request": {"headers": [{"key": ":Method", "value": "POST"}, {"key": ":path", "value": "/v1/events"},
                                    {"key": "host", "value": "analytics.acme.internal"},
                                    {"key": "X-Raw", "rawValue": "aGVsbG8="}],
                        "body": {"asString": "{}", "truncated": false}},
            "response": {"headers": [{"key": ":status", "value": "200"}],
                         "body": {"asBytes": "e30", "truncated": true}},
            "upstreamConnection": {}}}"#;
        let r = &load("c.json", text).unwrap()[0];
        assert_eq!(r.request.header(":method"), Some("POST"));
        assert_eq!(
            r.request.header(":authority"),
            Some("analytics.acme.internal")
        );
        assert_eq!(r.request.header("x-raw"), Some("hello"));
        assert_eq!(r.request.body, b"{}");
        let resp = r.response.as_ref().unwrap();
        assert_eq!(resp.body, b"{}");
        assert!(resp.body_truncated);
        assert!(
            r.warnings[0].contains("response body")
                && r.warnings[0].contains("max_buffered_tx_bytes")
        );

        let yaml = "http_buffered_trace:\n  request:\n    headers:\n      - {key: ':method', value: GET}\n      - {key: ':path', value: /}\n      - {key: ':authority', value: a}\n";
        assert_eq!(load("y.yaml", yaml).unwrap().len(), 1);
    }

    #[test]
    fn errors() {
        let e = err(r#"{"http_streamed_trace_segment": {"trace_id": "1"}}"#);
        assert!(
            e.message.contains(
                "streamed traces are not supported: configure the tap with http_buffered_trace"
            ),
            "{e}"
        );
        assert_eq!(e.location.as_deref(), Some("1:2"));
        let e = err(r#"{"socket_buffered_trace": {}}"#);
        assert!(e.message.contains("envoy.filters.http.tap"), "{e}");
        let e = err("{\"foo\": 1}");
        assert!(
            e.message.contains("http_buffered_trace") && e.message.contains("`foo`"),
            "{e}"
        );
        let e = err("{\"http_buffered_trace\": {\"request\": {\"headers\": [\n  {\"key\": \":method\", \"value\": \"GET\"}]}}}");
        assert!(e.message.contains("`:path`"), "{e}");
        assert_eq!(e.location.as_deref(), Some("1:37"));
        let e =
            err("{\"http_buffered_trace\": {\"request\": {\"body\": {\"as_bytes\": \"%%%\"}}}}");
        assert!(e.message.contains("base64"), "{e}");
        assert!(
            e.message
                .starts_with("/http_buffered_trace/request/body/as_bytes"),
            "{e}"
        );
        let e = err("{\"http_buffered_trace\": {\"request\": {\"headers\": {}}}}");
        assert!(e.message.contains("a list of"), "{e}");
        let e = err(&format!("{ONE}\n{{\"http_buffered_trace\": "));
        assert_eq!(
            e.location.as_deref().map(|l| l.starts_with("4:")),
            Some(true),
            "{e}"
        );
        let e = err(&format!("[{ONE}, 1]"));
        assert!(e.message.starts_with("/1: "), "{e}");
        let e = err(
            r#"{"http_buffered_trace": {"request": {"headers": [{"key": ":method", "value": "GET"},
            {"key": ":path", "value": "/"}, {"key": ":authority", "value": "a"}]},
            "response": {"headers": [{"key": "server", "value": "x"}]}}}"#,
        );
        assert!(e.message.contains(":status"), "{e}");
    }

    #[test]
    fn directories_without_json_traces() {
        let d = scratch_dir("pb");
        std::fs::write(d.join("tap_1.pb"), b"\x0a").unwrap();
        let e = load_dir(&d).unwrap_err();
        assert!(e.message.contains("JSON_BODY_AS_BYTES"), "{e}");
        let d2 = scratch_dir("empty");
        std::fs::write(d2.join("README"), b"x").unwrap();
        let e = load_dir(&d2).unwrap_err();
        assert!(e.message.contains("no tap files"), "{e}");
        let e = load_dir(&d2.join("missing")).unwrap_err();
        assert!(e.message.contains("cannot read"), "{e}");
        let _ = std::fs::remove_dir_all(d);
        let _ = std::fs::remove_dir_all(d2);
    }

    #[test]
    fn natural_order() {
        let mut names = vec![
            "tap_10.json",
            "tap_2.json",
            "tap_1.json",
            "tap_02.json",
            "a.json",
            "tap_x.json",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            [
                "a.json",
                "tap_1.json",
                "tap_2.json",
                "tap_02.json",
                "tap_10.json",
                "tap_x.json"
            ]
        );
    }
}
