//! HAR 1.2 files (browser developer tools, proxies, HTTP clients), read as plain HAR:
//! every entry of `log.entries` becomes one recording.
//!
//! - `request.url` gives `:scheme`, `:authority` (host and port, without user info) and
//!   `:path` (path and query; the fragment is dropped). Only `http` and `https` URLs are
//!   accepted. HAR's own pseudo-header entries (`:authority`, ... recorded for HTTP/2)
//!   and `Host` are dropped in favour of the URL; the other header names are lower-cased.
//! - `request.postData.text` is the request body (base64-decoded when
//!   `postData.encoding` is `base64`). Form `params` without `text` give an empty body
//!   and a warning.
//! - `response.content.text` is the response body (base64-decoded when
//!   `content.encoding` is `base64`). HAR stores bodies already decoded, so a
//!   `content-encoding` header other than `identity` is removed, with a warning.
//! - `content-length` and `transfer-encoding` are replaced by a `content-length` that
//!   matches the body, and a missing `content-type` is taken from `mimeType`.
//! - `response.status` 0 (the browser got no response) means no response, with a warning.
//! - The entry's `comment`, when present, is the recording's name. Other HAR fields
//!   (`timings`, `cookies`, `queryString`, `_custom` fields, ...) are ignored.
//!
//! A HAR file knows neither the upstream cluster nor the caller's mTLS identity, so
//! `cluster` and `peer_principal` are `None`, and the consent store is the default one.
//! `source` is `FILE:entries[N]` (N from 0).

use super::native::{decode_base64, Doc};
use super::{Message, Recording, TrafficError};
use crate::yamlpos;
use serde_json::{Map, Value};

/// Reads a HAR 1.2 file; see the module documentation.
pub fn load(file: &str, text: &str) -> Result<Vec<Recording>, TrafficError> {
    let (doc, pos) = yamlpos::parse(text).map_err(|e| TrafficError {
        file: file.to_string(),
        location: Some(format!("{}:{}", e.line, e.column)),
        message: e.message,
    })?;
    let d = Doc { file, pos: &pos };
    let entries = match doc.get("log").and_then(|l| l.get("entries")) {
        Some(Value::Array(a)) => a,
        Some(other) => return Err(d.type_err(other, "/log/entries", "a list of HAR entries")),
        None => {
            return Err(d.err(
                "",
                "not a HAR file: expected {\"log\": {\"entries\": [...]}} (export \"HAR\" from the browser's network panel)",
            ))
        }
    };
    if entries.is_empty() {
        return Err(d.err("/log/entries", "the HAR file has no entries"));
    }
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            entry(
                &d,
                e,
                &format!("/log/entries/{i}"),
                format!("{file}:entries[{i}]"),
            )
        })
        .collect()
}

fn obj<'v>(
    d: &Doc<'_>,
    v: &'v Value,
    ptr: &str,
    what: &str,
) -> Result<&'v Map<String, Value>, TrafficError> {
    v.as_object().ok_or_else(|| d.type_err(v, ptr, what))
}

fn required<'v>(
    d: &Doc<'_>,
    map: &'v Map<String, Value>,
    ptr: &str,
    key: &str,
) -> Result<(&'v Value, String), TrafficError> {
    map.get(key)
        .map(|v| (v, yamlpos::join(ptr, key)))
        .ok_or_else(|| d.err(ptr, format!("missing `{key}`, which HAR 1.2 requires here")))
}

fn entry(d: &Doc<'_>, v: &Value, ptr: &str, source: String) -> Result<Recording, TrafficError> {
    let map = obj(d, v, ptr, "a HAR entry")?;
    let mut warnings = Vec::new();
    let (req, req_ptr) = required(d, map, ptr, "request")?;
    let request = request(d, req, &req_ptr, &mut warnings)?;
    let (resp, resp_ptr) = required(d, map, ptr, "response")?;
    let response = response(d, resp, &resp_ptr, &mut warnings)?;
    let name = match map.get("comment") {
        Some(Value::String(c)) if !c.trim().is_empty() => Some(c.clone()),
        _ => None,
    };
    Ok(Recording {
        source,
        name,
        request,
        response,
        warnings,
        ..Recording::default()
    })
}

fn request(
    d: &Doc<'_>,
    v: &Value,
    ptr: &str,
    warnings: &mut Vec<String>,
) -> Result<Message, TrafficError> {
    let map = obj(d, v, ptr, "a HAR request")?;
    let (method, mptr) = required(d, map, ptr, "method")?;
    let method = d.string(method, &mptr)?;
    if method.is_empty() {
        return Err(d.err(&mptr, "the method is empty"));
    }
    let (url, uptr) = required(d, map, ptr, "url")?;
    let url = split_url(d.string(url, &uptr)?).map_err(|m| d.err(&uptr, m))?;
    let mut headers = vec![
        (":method".to_string(), method.to_string()),
        (":path".to_string(), url.path),
        (":authority".to_string(), url.authority),
        (":scheme".to_string(), url.scheme),
    ];
    headers.extend(header_list(d, map, ptr, &["host"])?);
    let mut body = Vec::new();
    let mut mime = None;
    if let Some(post) = map.get("postData").filter(|p| !p.is_null()) {
        let pptr = yamlpos::join(ptr, "postData");
        let post = obj(d, post, &pptr, "HAR postData")?;
        mime = post.get("mimeType").and_then(Value::as_str);
        match post.get("text") {
            Some(t) => body = text(d, t, post, &pptr)?,
            None => {
                if post
                    .get("params")
                    .and_then(Value::as_array)
                    .is_some_and(|p| !p.is_empty())
                {
                    warnings.push(
                        "the request's postData has only form `params`, no `text`: the body is replayed empty"
                            .into(),
                    );
                }
            }
        }
    }
    Ok(finish(headers, body, mime))
}

fn response(
    d: &Doc<'_>,
    v: &Value,
    ptr: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<Message>, TrafficError> {
    let map = obj(d, v, ptr, "a HAR response")?;
    let (status, sptr) = required(d, map, ptr, "status")?;
    let status = match status.as_u64() {
        Some(0) => {
            warnings.push(
                "the HAR recorded no response (status 0): only the request is replayed".into(),
            );
            return Ok(None);
        }
        Some(n @ 100..=599) => n,
        _ => {
            return Err(d.type_err(
                status,
                &sptr,
                "an HTTP status (100 to 599, or 0 for no response)",
            ));
        }
    };
    let mut headers = vec![(":status".to_string(), status.to_string())];
    let given = header_list(d, map, ptr, &[])?;
    for (name, value) in given {
        if name == "content-encoding" && !value.trim().eq_ignore_ascii_case("identity") {
            warnings.push(format!(
                "removed `content-encoding: {value}` from the response: HAR holds the decoded body"
            ));
            continue;
        }
        headers.push((name, value));
    }
    let mut body = Vec::new();
    let mut mime = None;
    if let Some(content) = map.get("content").filter(|c| !c.is_null()) {
        let cptr = yamlpos::join(ptr, "content");
        let content = obj(d, content, &cptr, "HAR response content")?;
        mime = content.get("mimeType").and_then(Value::as_str);
        match content.get("text") {
            Some(t) => body = text(d, t, content, &cptr)?,
            None => {
                if content
                    .get("size")
                    .and_then(Value::as_i64)
                    .is_some_and(|s| s > 0)
                {
                    warnings.push(
                        "the HAR does not hold the response body (content.text is missing): it is replayed empty"
                            .into(),
                    );
                }
            }
        }
    }
    Ok(Some(finish(headers, body, mime)))
}

/// `text` of postData or content, decoded as `encoding` says.
fn text(
    d: &Doc<'_>,
    t: &Value,
    map: &Map<String, Value>,
    ptr: &str,
) -> Result<Vec<u8>, TrafficError> {
    let tptr = yamlpos::join(ptr, "text");
    let s = d.string(t, &tptr)?;
    match map.get("encoding") {
        None | Some(Value::Null) => Ok(s.as_bytes().to_vec()),
        Some(Value::String(e)) if e.is_empty() => Ok(s.as_bytes().to_vec()),
        Some(Value::String(e)) if e.eq_ignore_ascii_case("base64") => {
            let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
            decode_base64(&compact).map_err(|e| {
                d.err(
                    &tptr,
                    format!("`text` is marked base64 but is not valid base64 ({e})"),
                )
            })
        }
        Some(other) => Err(d.err(
            &yamlpos::join(ptr, "encoding"),
            format!("unsupported encoding {other}; HAR bodies are plain text or base64"),
        )),
    }
}

/// The `headers` of a HAR request or response: pseudo-headers and `drop` removed,
/// names lower-cased.
fn header_list(
    d: &Doc<'_>,
    map: &Map<String, Value>,
    ptr: &str,
    drop: &[&str],
) -> Result<Vec<(String, String)>, TrafficError> {
    let Some(list) = map.get("headers") else {
        return Ok(Vec::new());
    };
    let hptr = yamlpos::join(ptr, "headers");
    let Value::Array(items) = list else {
        return Err(d.type_err(list, &hptr, "a list of {\"name\": ..., \"value\": ...}"));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let p = format!("{hptr}/{i}");
        let h = obj(d, item, &p, "a header {\"name\": ..., \"value\": ...}")?;
        let (name, nptr) = required(d, h, &p, "name")?;
        let name = d.string(name, &nptr)?.to_ascii_lowercase();
        let value = match h.get("value") {
            Some(v) => d.string(v, &yamlpos::join(&p, "value"))?.to_string(),
            None => String::new(),
        };
        if name.is_empty() || name.starts_with(':') || drop.contains(&name.as_str()) {
            continue;
        }
        out.push((name, value));
    }
    Ok(out)
}

/// Adds the body and makes the framing headers match it.
fn finish(mut headers: Vec<(String, String)>, body: Vec<u8>, mime: Option<&str>) -> Message {
    headers.retain(|(k, _)| k != "content-length" && k != "transfer-encoding");
    if !body.is_empty() {
        if let Some(m) = mime
            .map(str::trim)
            .filter(|m| !m.is_empty() && *m != "x-unknown")
        {
            if !headers.iter().any(|(k, _)| k == "content-type") {
                headers.push(("content-type".into(), m.to_string()));
            }
        }
        headers.push(("content-length".into(), body.len().to_string()));
    }
    Message {
        headers,
        body,
        trailers: Vec::new(),
        body_truncated: false,
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Url {
    scheme: String,
    authority: String,
    path: String,
}

fn split_url(url: &str) -> Result<Url, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("the url is not an absolute http(s) URL (scheme://host/path)".into());
    };
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "the url's scheme is `{scheme}`; only http and https exchanges can be replayed: remove this entry"
        ));
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if authority.is_empty() {
        return Err("the url has no host".into());
    }
    let tail = tail.split_once('#').map_or(tail, |(before, _)| before);
    let path = if tail.starts_with('/') {
        tail.to_string()
    } else {
        format!("/{tail}")
    };
    Ok(Url {
        scheme,
        authority: authority.to_string(),
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../../tests/traffic/acme.har");

    fn names(m: &Message) -> Vec<&str> {
        m.headers.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn the_acme_har_loads() {
        let recs = load("acme.har", FIXTURE).unwrap();
        assert_eq!(recs.len(), 3);

        let r = &recs[0];
        assert_eq!(r.source, "acme.har:entries[0]");
        assert_eq!(
            r.name.as_deref(),
            Some("support agent opens the customer list")
        );
        assert_eq!(
            names(&r.request),
            [
                ":method",
                ":path",
                ":authority",
                ":scheme",
                "accept",
                "x-consentry-caller",
                "user-agent"
            ]
        );
        assert_eq!(r.request.header(":path"), Some("/v1/customers?page=1"));
        assert_eq!(
            r.request.header(":authority"),
            Some("profile.acme.internal")
        );
        assert_eq!(r.request.header(":scheme"), Some("https"));
        let resp = r.response.as_ref().unwrap();
        assert_eq!(resp.header(":status"), Some("200"));
        assert_eq!(resp.header("content-encoding"), None);
        assert_eq!(
            resp.header("content-length"),
            Some(resp.body.len().to_string().as_str())
        );
        let body: Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(body["customers"][1]["id"], "c-1003");
        assert_eq!(r.warnings.len(), 1);
        assert!(
            r.warnings[0].contains("content-encoding: gzip"),
            "{:?}",
            r.warnings
        );

        let r = &recs[1];
        assert_eq!(r.name, None);
        assert_eq!(
            r.request.header(":authority"),
            Some("analytics.acme.internal:8080")
        );
        assert_eq!(r.request.header(":scheme"), Some("http"));
        assert_eq!(r.request.header("host"), None);
        assert_eq!(r.request.header("x-customer-id"), Some("c-1002"));
        assert_eq!(r.request.header("content-type"), Some("application/json"));
        assert_eq!(
            r.request.header("content-length"),
            Some(r.request.body.len().to_string().as_str())
        );
        assert_eq!(r.response.as_ref().unwrap().body, br#"{"accepted":1}"#);
        assert!(r.warnings.is_empty());

        let r = &recs[2];
        let body: Value = serde_json::from_slice(&r.request.body).unwrap();
        assert_eq!(body["customers"][0]["iban"], "SE4550000000058398257466");
        assert!(r.response.is_none());
        assert!(r.warnings[0].contains("status 0"), "{:?}", r.warnings);
    }

    #[test]
    fn urls() {
        let u = split_url("HTTPS://user:pw@Host.example:8443?q=1#frag").unwrap();
        assert_eq!(
            u,
            Url {
                scheme: "https".into(),
                authority: "Host.example:8443".into(),
                path: "/?q=1".into()
            }
        );
        assert_eq!(split_url("http://a").unwrap().path, "/");
        assert_eq!(
            split_url("http://a/b/c?x=%20y").unwrap().path,
            "/b/c?x=%20y"
        );
        assert!(split_url("data:text/plain,hi")
            .unwrap_err()
            .contains("absolute"));
        assert!(split_url("ws://a/b").unwrap_err().contains("`ws`"));
        assert!(split_url("http:///x").unwrap_err().contains("no host"));
    }

    fn one(entry: &str) -> String {
        format!("{{\"log\": {{\"version\": \"1.2\", \"entries\": [\n{entry}\n]}}}}")
    }

    #[test]
    fn bodies_and_headers() {
        let text = one(
            r#"{"request": {"method": "POST", "url": "http://a/x", "headers": [
              {"name": "Content-Length", "value": "999"}, {"name": "Transfer-Encoding", "value": "chunked"}],
              "postData": {"mimeType": "application/json", "params": [{"name": "a", "value": "b"}]}},
            "response": {"status": 200, "headers": [{"name": "Content-Encoding", "value": "identity"}],
              "content": {"size": 10, "mimeType": "text/plain"}}}"#,
        );
        let r = &load("h.har", &text).unwrap()[0];
        assert!(r.request.body.is_empty());
        assert_eq!(
            names(&r.request),
            [":method", ":path", ":authority", ":scheme"]
        );
        let resp = r.response.as_ref().unwrap();
        assert_eq!(resp.header("content-encoding"), Some("identity"));
        assert_eq!(resp.header("content-type"), None);
        assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
    }

    #[test]
    fn errors() {
        let cases: &[(String, &str, &str)] = &[
            ("{\"log\": {}}".into(), "1:1", "not a HAR file"),
            ("{\"log\": {\"entries\": []}}".into(), "1:21", "no entries"),
            (
                one(
                    r#"{"request": {"method": "GET", "url": "ftp://a/x"}, "response": {"status": 200}}"#,
                ),
                "2:38",
                "only http and https",
            ),
            (
                one(
                    r#"{"request": {"method": "GET", "url": "http://a/x"}, "response": {"status": 700}}"#,
                ),
                "2:76",
                "an HTTP status",
            ),
            (
                one(r#"{"request": {"method": "GET", "url": "http://a/x"}}"#),
                "2:1",
                "missing `response`",
            ),
            (
                one(
                    r#"{"request": {"method": "POST", "url": "http://a/x", "postData": {"text": "%%", "encoding": "base64"}}, "response": {"status": 0}}"#,
                ),
                "2:74",
                "not valid base64",
            ),
            (
                one(
                    r#"{"request": {"method": "POST", "url": "http://a/x", "postData": {"text": "x", "encoding": "gzip"}}, "response": {"status": 0}}"#,
                ),
                "2:91",
                "unsupported encoding",
            ),
        ];
        for (text, at, needle) in cases {
            let e = load("e.har", text).unwrap_err();
            assert_eq!(e.location.as_deref(), Some(*at), "{text}\n{e}");
            assert!(e.message.contains(needle), "{e}");
        }
    }
}
