//! The native replay format: recorded or hand-written exchanges, each with the scripted
//! consent store and, optionally, what the filter must do with it.
//!
//! A replay file is YAML or JSON (JSON is read as JSON; it is also valid YAML). It holds
//! one mapping with these keys (every other key is an error, at every level):
//!
//! ```yaml
//! # Optional: how the consent store answers during every exchange (default: it knows
//! # no subject, i.e. `answer: {}`).
//! consent_store:
//!   answer: { "c-1003": { marketing_email: true } }
//! exchanges:                                  # required, at least one
//!   - name: marketing reads the batch        # optional, shown in reports
//!     cluster: profile                       # optional: Envoy upstream cluster (xds.cluster_name)
//!     principal: spiffe://acme.internal/ns/marketing/sa/mailer   # optional: caller's mTLS identity
//!     request:                               # required
//!       method: GET                          # default GET
//!       path: /v1/customers?page=1           # required: path and query, starts with /
//!       authority: profile.acme.internal     # required
//!       scheme: http                         # default http
//!       headers: { x-consentry-caller: marketing-email }
//!       body: { "customers": [] }            # or body_text: "...", or body_base64: "..."
//!       trailers: {}
//!     response:                              # optional; absent or null: the upstream never answered
//!       status: 200                          # default 200
//!       headers: { content-type: application/json }
//!       body: { "customers": [] }            # as for the request
//!     consent_store: { status: 500 }         # optional: overrides the file's consent_store
//!     expect:                                # optional
//!       request:  { delivered: true, outcome: modified, headers: { x-customer-email: null } }
//!       response: { status: 200, outcome: modified, body: { "customers": [] } }
//! ```
//!
//! **`consent_store`** has exactly one of these keys:
//!
//! | key | the store ... |
//! | --- | --- |
//! | `answer: {SUBJECT: {CONSENT_KEY: BOOL}}` | answers from this data; a grant may also be written `{granted: BOOL}`; a subject not listed is unknown to the store |
//! | `status: N` | answers every lookup with HTTP status N (100..=599) and an empty body |
//! | `garbage: true` | answers 200 with a body that is not the store's format |
//! | `timeout: true` | never answers (the call times out) |
//! | `down: true` | cannot be connected to |
//!
//! **Messages** (`request`, `response`):
//!
//! - `headers` and `trailers` map a header name to a string, or to a list of strings for a
//!   header sent several times. Numbers and booleans are taken as their text. Names are
//!   lower-cased. Pseudo-headers (`:path`, ...) are not written here: they come from
//!   `method`, `path`, `authority`, `scheme` and `status`.
//! - At most one of `body` (any JSON value, sent as compact JSON text: `body: null` sends
//!   the four bytes `null`; leave the key out for no body), `body_text` (a string, sent as
//!   UTF-8) and `body_base64` (standard base64; line breaks and spaces are ignored).
//! - The request's headers are, in order: `:method`, `:path`, `:authority`, `:scheme`, the
//!   given headers, then the headers added for the body. The response's: `:status`, the
//!   given headers, then the added ones.
//! - Added for the body: `content-type: application/json` when `body` is given and no
//!   `content-type` is; `content-length` when the body is not empty and neither
//!   `content-length` nor `transfer-encoding` is given.
//!
//! **`expect`** has `request` and `response`, both optional, each with these keys, all
//! optional (a key left out is not checked):
//!
//! | key | meaning |
//! | --- | --- |
//! | `delivered: BOOL` | whether the message reached its recipient at all |
//! | `status: N` | the status the filter answered with locally (a refusal: 403, 415, 503, ...) |
//! | `outcome: O` | the decision log's outcome: `allowed`, `modified`, `blocked` or `uninspectable` |
//! | `body: JSON` | the body the recipient received, compared as JSON (exact; key order ignored) |
//! | `headers: {NAME: VALUE \| null}` | headers the recipient received: a string must be equal, `null` must be absent |
//!
//! Each exchange becomes one [`Recording`] whose `source` is `FILE:exchanges[N]` (N from 0).
//! Errors name the file, the line and column, the JSON Pointer of the offending value and
//! what to write instead.

use super::{DirectionExpectation, Expectation, Message, Recording, StoreBehaviour, TrafficError};
use crate::yamlpos::{self, Positions};
use base64::Engine as _;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Reads a native replay file (YAML or JSON); see the module documentation.
pub fn load(file: &str, text: &str) -> Result<Vec<Recording>, TrafficError> {
    let (doc, pos) = yamlpos::parse(text).map_err(|e| TrafficError {
        file: file.to_string(),
        location: Some(format!("{}:{}", e.line, e.column)),
        message: e.message,
    })?;
    let d = Doc { file, pos: &pos };
    let top = d.object(&doc, "", "a replay file", TOP_KEYS)?;
    let default_store = match top.get("consent_store") {
        Some(v) => d.store(v, "/consent_store")?,
        None => StoreBehaviour::default(),
    };
    let exchanges = match top.get("exchanges") {
        Some(Value::Array(a)) => a,
        Some(other) => return Err(d.type_err(other, "/exchanges", "a list of exchanges")),
        None => return Err(d.err(
            "",
            "missing key `exchanges`: add `exchanges:` with a list of request/response exchanges",
        )),
    };
    if exchanges.is_empty() {
        return Err(d.err(
            "/exchanges",
            "`exchanges` is empty: add at least one exchange",
        ));
    }
    exchanges
        .iter()
        .enumerate()
        .map(|(i, ex)| d.exchange(ex, &format!("/exchanges/{i}"), i, &default_store))
        .collect()
}

const TOP_KEYS: &[&str] = &["consent_store", "exchanges"];
const EXCHANGE_KEYS: &[&str] = &[
    "name",
    "cluster",
    "principal",
    "request",
    "response",
    "consent_store",
    "expect",
];
const REQUEST_KEYS: &[&str] = &[
    "method",
    "path",
    "authority",
    "scheme",
    "headers",
    "body",
    "body_text",
    "body_base64",
    "trailers",
];
const RESPONSE_KEYS: &[&str] = &[
    "status",
    "headers",
    "body",
    "body_text",
    "body_base64",
    "trailers",
];
const STORE_KEYS: &[&str] = &["answer", "status", "garbage", "timeout", "down"];
const EXPECT_KEYS: &[&str] = &["request", "response"];
const DIRECTION_KEYS: &[&str] = &["delivered", "status", "outcome", "body", "headers"];
const OUTCOMES: &[&str] = &["allowed", "modified", "blocked", "uninspectable"];

/// A parsed document and where its nodes are: builds errors that name file and line.
/// Shared by the loaders of this module's siblings.
pub(crate) struct Doc<'a> {
    pub(crate) file: &'a str,
    pub(crate) pos: &'a Positions,
}

impl Doc<'_> {
    fn location(&self, ptr: &str, prefer_key: bool) -> String {
        let at = if prefer_key {
            self.pos.key(ptr).or_else(|| self.pos.nearest(ptr))
        } else {
            self.pos.value(ptr).or_else(|| self.pos.nearest(ptr))
        };
        match at {
            Some(p) => p.to_string(),
            None => display_ptr(ptr),
        }
    }

    fn make(&self, ptr: &str, prefer_key: bool, message: impl AsRef<str>) -> TrafficError {
        TrafficError {
            file: self.file.to_string(),
            location: Some(self.location(ptr, prefer_key)),
            message: format!("{}: {}", display_ptr(ptr), message.as_ref()),
        }
    }

    /// An error about the value at `ptr`, located at the value.
    pub(crate) fn err(&self, ptr: &str, message: impl AsRef<str>) -> TrafficError {
        self.make(ptr, false, message)
    }

    /// An error about the mapping entry at `ptr`, located at its key.
    pub(crate) fn key_err(&self, ptr: &str, message: impl AsRef<str>) -> TrafficError {
        self.make(ptr, true, message)
    }

    pub(crate) fn type_err(&self, v: &Value, ptr: &str, expected: &str) -> TrafficError {
        self.err(ptr, format!("expected {expected}, found {}", describe(v)))
    }

    /// `v` as a mapping whose keys are all in `allowed`.
    pub(crate) fn object<'v>(
        &self,
        v: &'v Value,
        ptr: &str,
        what: &str,
        allowed: &[&str],
    ) -> Result<&'v Map<String, Value>, TrafficError> {
        let Value::Object(map) = v else {
            return Err(self.type_err(v, ptr, &format!("a mapping ({what})")));
        };
        for key in map.keys() {
            if !allowed.contains(&key.as_str()) {
                let hint = match closest(key, allowed) {
                    Some(c) => format!(" (did you mean `{c}`?)"),
                    None => String::new(),
                };
                return Err(self.key_err(
                    &yamlpos::join(ptr, key),
                    format!(
                        "unknown key `{key}` in {what}{hint}; allowed keys: {}",
                        allowed.join(", ")
                    ),
                ));
            }
        }
        Ok(map)
    }

    pub(crate) fn string<'v>(&self, v: &'v Value, ptr: &str) -> Result<&'v str, TrafficError> {
        v.as_str().ok_or_else(|| self.type_err(v, ptr, "a string"))
    }

    fn opt_string(
        &self,
        map: &Map<String, Value>,
        ptr: &str,
        key: &str,
    ) -> Result<Option<String>, TrafficError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                let p = yamlpos::join(ptr, key);
                let s = self.string(v, &p)?;
                if s.trim().is_empty() {
                    return Err(self.err(
                        &p,
                        format!("`{key}` is empty; give a value or leave the key out"),
                    ));
                }
                Ok(Some(s.to_string()))
            }
        }
    }

    fn bool(&self, v: &Value, ptr: &str) -> Result<bool, TrafficError> {
        v.as_bool()
            .ok_or_else(|| self.type_err(v, ptr, "true or false"))
    }

    fn status(&self, v: &Value, ptr: &str) -> Result<u16, TrafficError> {
        match v.as_u64() {
            Some(n @ 100..=599) => Ok(n as u16),
            _ => Err(self.err(
                ptr,
                format!(
                    "expected an HTTP status (a whole number from 100 to 599), found {}",
                    describe(v)
                ),
            )),
        }
    }

    /// A header value: string, number or boolean (as text).
    fn header_value(&self, v: &Value, ptr: &str) -> Result<String, TrafficError> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            _ => Err(self.type_err(
                v,
                ptr,
                "a header value (a string; write \"\" for an empty value)",
            )),
        }
    }

    /// A header name, lower-cased; pseudo-headers refused unless `pseudo_ok`.
    pub(crate) fn header_name(
        &self,
        name: &str,
        ptr: &str,
        pseudo_ok: bool,
    ) -> Result<String, TrafficError> {
        let lower = name.to_ascii_lowercase();
        let bare = match lower.strip_prefix(':') {
            None => lower.as_str(),
            Some(bare) if pseudo_ok => bare,
            Some(_) => {
                return Err(self.key_err(
                    ptr,
                    format!(
                        "`{name}` is a pseudo-header; set it with `method`, `path`, `authority`, \
                         `scheme` or `status` instead"
                    ),
                ))
            }
        };
        if bare.is_empty() || !bare.bytes().all(is_token_char) {
            return Err(self.key_err(
                ptr,
                format!(
                    "`{name}` is not a valid header name (letters, digits and !#$%&'*+-.^_`|~)"
                ),
            ));
        }
        Ok(lower)
    }

    /// `{name: value | [values]}` → header pairs in order.
    fn headers(&self, v: &Value, ptr: &str) -> Result<Vec<(String, String)>, TrafficError> {
        let Value::Object(map) = v else {
            return Err(self.type_err(v, ptr, "a mapping of header names to values"));
        };
        let mut out = Vec::new();
        for (name, value) in map {
            let p = yamlpos::join(ptr, name);
            let lower = self.header_name(name, &p, false)?;
            match value {
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        out.push((lower.clone(), self.header_value(item, &format!("{p}/{i}"))?));
                    }
                }
                _ => out.push((lower, self.header_value(value, &p)?)),
            }
        }
        Ok(out)
    }

    /// The body of a message: `(bytes, given as a JSON value)`.
    fn body(&self, map: &Map<String, Value>, ptr: &str) -> Result<(Vec<u8>, bool), TrafficError> {
        let given: Vec<&str> = ["body", "body_text", "body_base64"]
            .into_iter()
            .filter(|k| map.contains_key(*k))
            .collect();
        if given.len() > 1 {
            return Err(self.key_err(
                &yamlpos::join(ptr, given[1]),
                format!(
                    "both `{}` and `{}` are given; a message has one body: keep one of them",
                    given[0], given[1]
                ),
            ));
        }
        if let Some(v) = map.get("body") {
            let bytes = serde_json::to_vec(v).map_err(|e| {
                self.err(
                    &yamlpos::join(ptr, "body"),
                    format!("cannot serialise: {e}"),
                )
            })?;
            return Ok((bytes, true));
        }
        if let Some(v) = map.get("body_text") {
            let p = yamlpos::join(ptr, "body_text");
            return Ok((self.string(v, &p)?.as_bytes().to_vec(), false));
        }
        if let Some(v) = map.get("body_base64") {
            let p = yamlpos::join(ptr, "body_base64");
            let s = self.string(v, &p)?;
            let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
            let bytes = decode_base64(&compact).map_err(|e| {
                self.err(
                    &p,
                    format!("not valid base64 ({e}); use the standard alphabet (A-Z a-z 0-9 + /)"),
                )
            })?;
            return Ok((bytes, false));
        }
        Ok((Vec::new(), false))
    }

    fn store(&self, v: &Value, ptr: &str) -> Result<StoreBehaviour, TrafficError> {
        let map = self.object(v, ptr, "a consent_store", STORE_KEYS)?;
        let one_of = "give exactly one of: answer: {SUBJECT: {KEY: true}}, status: 500, \
                      garbage: true, timeout: true, down: true";
        let mut entries = map.iter();
        let (Some((key, value)), None) = (entries.next(), entries.next()) else {
            return Err(self.err(
                ptr,
                format!("consent_store has {} keys; {one_of}", map.len()),
            ));
        };
        let p = yamlpos::join(ptr, key);
        let flag = |name: &str| -> Result<(), TrafficError> {
            if self.bool(value, &p)? {
                Ok(())
            } else {
                Err(self.err(
                    &p,
                    format!("`{name}: false` means nothing; leave the key out or {one_of}"),
                ))
            }
        };
        match key.as_str() {
            "answer" => {
                let Value::Object(subjects) = value else {
                    return Err(self.type_err(
                        value,
                        &p,
                        "a mapping of subject ids to their consents",
                    ));
                };
                let mut out = BTreeMap::new();
                for (subject, consents) in subjects {
                    let sp = yamlpos::join(&p, subject);
                    let Value::Object(consents) = consents else {
                        return Err(self.type_err(
                            consents,
                            &sp,
                            "a mapping of consent keys to true/false (e.g. { marketing_email: true })",
                        ));
                    };
                    let mut grants = BTreeMap::new();
                    for (k, g) in consents {
                        let kp = yamlpos::join(&sp, k);
                        let granted = match g {
                            Value::Bool(b) => *b,
                            Value::Object(o)
                                if o.len() == 1
                                    && o.get("granted").is_some_and(Value::is_boolean) =>
                            {
                                o.get("granted").and_then(Value::as_bool).unwrap_or(false)
                            }
                            _ => {
                                return Err(self.type_err(
                                    g,
                                    &kp,
                                    "true, false or {granted: true|false}",
                                ))
                            }
                        };
                        grants.insert(k.clone(), granted);
                    }
                    out.insert(subject.clone(), grants);
                }
                Ok(StoreBehaviour::Answer(out))
            }
            "status" => Ok(StoreBehaviour::Status(self.status(value, &p)?)),
            "garbage" => flag("garbage").map(|_| StoreBehaviour::Garbage),
            "timeout" => flag("timeout").map(|_| StoreBehaviour::Timeout),
            _ => flag("down").map(|_| StoreBehaviour::Down),
        }
    }

    fn exchange(
        &self,
        v: &Value,
        ptr: &str,
        index: usize,
        default_store: &StoreBehaviour,
    ) -> Result<Recording, TrafficError> {
        let map = self.object(v, ptr, "an exchange", EXCHANGE_KEYS)?;
        let Some(request) = map.get("request") else {
            return Err(self.err(
                ptr,
                "missing key `request`: every exchange needs a request with at least `path` and `authority`",
            ));
        };
        let request = self.request(request, &yamlpos::join(ptr, "request"))?;
        let response = match map.get("response") {
            None | Some(Value::Null) => None,
            Some(r) => Some(self.response(r, &yamlpos::join(ptr, "response"))?),
        };
        let store = match map.get("consent_store") {
            Some(s) => self.store(s, &yamlpos::join(ptr, "consent_store"))?,
            None => default_store.clone(),
        };
        let expect = match map.get("expect") {
            None | Some(Value::Null) => None,
            Some(e) => Some(self.expect(e, &yamlpos::join(ptr, "expect"))?),
        };
        Ok(Recording {
            source: format!("{}:exchanges[{index}]", self.file),
            name: self.opt_string(map, ptr, "name")?,
            request,
            response,
            cluster: self.opt_string(map, ptr, "cluster")?,
            peer_principal: self.opt_string(map, ptr, "principal")?,
            store,
            expect,
            warnings: Vec::new(),
        })
    }

    fn request(&self, v: &Value, ptr: &str) -> Result<Message, TrafficError> {
        let map = self.object(v, ptr, "a request", REQUEST_KEYS)?;
        let method = self
            .opt_string(map, ptr, "method")?
            .unwrap_or_else(|| "GET".into());
        if !method.bytes().all(is_token_char) {
            return Err(self.err(
                &yamlpos::join(ptr, "method"),
                format!("`{method}` is not an HTTP method"),
            ));
        }
        let Some(path) = self.opt_string(map, ptr, "path")? else {
            return Err(self.err(
                ptr,
                "missing key `path`: the request's path and query, e.g. /v1/customers",
            ));
        };
        if !path.starts_with('/') || path.chars().any(char::is_whitespace) {
            return Err(self.err(
                &yamlpos::join(ptr, "path"),
                format!("`{path}` is not a request path: it must start with / and hold no spaces (e.g. /v1/customers?page=1)"),
            ));
        }
        let Some(authority) = self.opt_string(map, ptr, "authority")? else {
            return Err(self.err(
                ptr,
                "missing key `authority`: the host the request is sent to, e.g. profile.acme.internal",
            ));
        };
        let scheme = self
            .opt_string(map, ptr, "scheme")?
            .unwrap_or_else(|| "http".into());
        let mut headers = vec![
            (":method".to_string(), method),
            (":path".to_string(), path),
            (":authority".to_string(), authority),
            (":scheme".to_string(), scheme),
        ];
        self.fill(map, ptr, &mut headers)
    }

    fn response(&self, v: &Value, ptr: &str) -> Result<Message, TrafficError> {
        let map = self.object(v, ptr, "a response", RESPONSE_KEYS)?;
        let status = match map.get("status") {
            None => 200,
            Some(s) => self.status(s, &yamlpos::join(ptr, "status"))?,
        };
        let mut headers = vec![(":status".to_string(), status.to_string())];
        self.fill(map, ptr, &mut headers)
    }

    /// Headers, body and trailers of a message whose pseudo-headers are in `headers`.
    fn fill(
        &self,
        map: &Map<String, Value>,
        ptr: &str,
        headers: &mut Vec<(String, String)>,
    ) -> Result<Message, TrafficError> {
        if let Some(h) = map.get("headers") {
            headers.extend(self.headers(h, &yamlpos::join(ptr, "headers"))?);
        }
        let trailers = match map.get("trailers") {
            Some(t) => self.headers(t, &yamlpos::join(ptr, "trailers"))?,
            None => Vec::new(),
        };
        let (body, is_json) = self.body(map, ptr)?;
        let has = |name: &str, headers: &[(String, String)]| headers.iter().any(|(k, _)| k == name);
        if is_json && !has("content-type", headers) {
            headers.push(("content-type".into(), "application/json".into()));
        }
        if !body.is_empty() && !has("content-length", headers) && !has("transfer-encoding", headers)
        {
            headers.push(("content-length".into(), body.len().to_string()));
        }
        Ok(Message {
            headers: std::mem::take(headers),
            body,
            trailers,
            body_truncated: false,
        })
    }

    fn expect(&self, v: &Value, ptr: &str) -> Result<Expectation, TrafficError> {
        let map = self.object(v, ptr, "an expectation", EXPECT_KEYS)?;
        let mut out = Expectation::default();
        if let Some(r) = map.get("request") {
            out.request = self.direction(r, &yamlpos::join(ptr, "request"))?;
        }
        if let Some(r) = map.get("response") {
            out.response = self.direction(r, &yamlpos::join(ptr, "response"))?;
        }
        Ok(out)
    }

    fn direction(&self, v: &Value, ptr: &str) -> Result<DirectionExpectation, TrafficError> {
        let mut out = DirectionExpectation::default();
        if v.is_null() {
            return Ok(out);
        }
        let map = self.object(v, ptr, "an expectation for one direction", DIRECTION_KEYS)?;
        if let Some(d) = map.get("delivered") {
            out.delivered = Some(self.bool(d, &yamlpos::join(ptr, "delivered"))?);
        }
        if let Some(s) = map.get("status") {
            out.status = Some(self.status(s, &yamlpos::join(ptr, "status"))?);
        }
        if let Some(o) = map.get("outcome") {
            let p = yamlpos::join(ptr, "outcome");
            let o = self.string(o, &p)?;
            if !OUTCOMES.contains(&o) {
                return Err(self.err(
                    &p,
                    format!("unknown outcome `{o}`; use one of: {}", OUTCOMES.join(", ")),
                ));
            }
            out.outcome = Some(o.to_string());
        }
        if let Some(b) = map.get("body") {
            out.body = Some(b.clone());
        }
        if let Some(h) = map.get("headers") {
            let p = yamlpos::join(ptr, "headers");
            let Value::Object(h) = h else {
                return Err(self.type_err(h, &p, "a mapping of header names to a value or null"));
            };
            for (name, value) in h {
                let np = yamlpos::join(&p, name);
                let lower = self.header_name(name, &np, true)?;
                let expected = match value {
                    Value::Null => None,
                    Value::Array(_) | Value::Object(_) => {
                        return Err(self.type_err(
                            value,
                            &np,
                            "a header value, or null for \"must be absent\"",
                        ))
                    }
                    other => Some(self.header_value(other, &np)?),
                };
                if out.headers.insert(lower.clone(), expected).is_some() {
                    return Err(self.key_err(
                        &np,
                        format!("header `{lower}` is expected twice (names are case-insensitive)"),
                    ));
                }
            }
        }
        Ok(out)
    }
}

/// A JSON Pointer as shown in messages (`/` for the root).
pub(crate) fn display_ptr(ptr: &str) -> String {
    if ptr.is_empty() {
        "/".to_string()
    } else {
        ptr.to_string()
    }
}

pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Decodes base64, standard or URL-safe alphabet, padding optional.
pub(crate) fn decode_base64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::alphabet;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let standard = GeneralPurpose::new(&alphabet::STANDARD, config);
    match standard.decode(s) {
        Ok(b) => Ok(b),
        Err(e) if s.contains(['-', '_']) => GeneralPurpose::new(&alphabet::URL_SAFE, config)
            .decode(s)
            .map_err(|_| e),
        Err(e) => Err(e),
    }
}

/// The allowed key closest to `key`, when it is close enough to be a typo.
fn closest<'a>(key: &str, allowed: &[&'a str]) -> Option<&'a str> {
    allowed
        .iter()
        .map(|a| (edit_distance(key, a), *a))
        .filter(|(d, a)| *d <= 2.max(a.len() / 4) && *d < a.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIXTURE: &str = include_str!("../../../tests/traffic/acme.replay.yaml");

    fn names(m: &Message) -> Vec<&str> {
        m.headers.iter().map(|(k, _)| k.as_str()).collect()
    }

    fn load_err(text: &str) -> TrafficError {
        match load("t.yaml", text) {
            Ok(r) => panic!("expected an error, got {r:?}"),
            Err(e) => e,
        }
    }

    const MIN: &str = "exchanges:\n  - request: { path: /v1/x, authority: a.internal }\n";

    #[test]
    fn the_acme_fixture_loads() {
        let recs = load("acme.replay.yaml", FIXTURE).unwrap();
        assert_eq!(recs.len(), 7);
        let r = &recs[0];
        assert_eq!(r.source, "acme.replay.yaml:exchanges[0]");
        assert_eq!(r.cluster.as_deref(), Some("analytics"));
        assert_eq!(
            r.peer_principal.as_deref(),
            Some("spiffe://acme.internal/ns/core/sa/profile")
        );
        assert_eq!(
            names(&r.request),
            [
                ":method",
                ":path",
                ":authority",
                ":scheme",
                "x-request-id",
                "x-customer-id",
                "x-customer-email",
                "content-type",
                "content-length"
            ]
        );
        assert_eq!(r.request.header(":method"), Some("POST"));
        assert_eq!(r.request.header(":scheme"), Some("http"));
        assert_eq!(r.request.header("content-type"), Some("application/json"));
        let body: Value = serde_json::from_slice(&r.request.body).unwrap();
        assert_eq!(body["customers"][0]["phone"], json!("+4915112345671"));
        assert_eq!(body["customers"][1]["birth_year"], json!(1974));
        assert_eq!(
            r.request.header("content-length"),
            Some(r.request.body.len().to_string().as_str())
        );
        let resp = r.response.as_ref().unwrap();
        assert_eq!(names(resp), [":status", "content-type", "content-length"]);
        assert_eq!(resp.header(":status"), Some("202"));
        assert_eq!(resp.body, br#"{"accepted":2}"#);
        let ex = r.expect.as_ref().unwrap();
        assert_eq!(ex.request.delivered, Some(true));
        assert_eq!(ex.request.outcome.as_deref(), Some("modified"));
        assert_eq!(ex.request.headers.get("x-customer-email"), Some(&None));
        assert_eq!(
            ex.request.headers.get("x-customer-id"),
            Some(&Some("c-1001".to_string()))
        );
        assert_eq!(ex.response.body, Some(json!({"accepted": 2})));
        let StoreBehaviour::Answer(a) = &r.store else {
            panic!("{:?}", r.store)
        };
        assert!(a["c-1003"]["marketing_email"]);
        assert!(!a["c-1003"]["social_profiling"]);

        // GET by default, no body, no added headers.
        let r = &recs[1];
        assert_eq!(r.request.header(":method"), Some("GET"));
        assert_eq!(r.request.header(":path"), Some("/v1/customers?page=1"));
        assert!(r.request.body.is_empty());
        assert_eq!(names(&r.request).len(), 5);
        let expected = &r.expect.as_ref().unwrap().response.body;
        assert_eq!(
            expected.as_ref().unwrap()["customers"][1]["phone"],
            json!("********4564")
        );
        // Status defaults to 200.
        assert_eq!(
            recs[2].response.as_ref().unwrap().header(":status"),
            Some("200")
        );
        // No response: the upstream never answered.
        assert!(recs[3].response.is_none());
        assert_eq!(recs[3].expect.as_ref().unwrap().request.status, Some(403));
        // body_text: sent as given, no JSON content-type added.
        let r = &recs[4];
        assert_eq!(r.request.header("content-type"), Some("text/plain"));
        assert_eq!(
            names(&r.request)
                .iter()
                .filter(|n| **n == "content-type")
                .count(),
            1
        );
        assert!(r.request.body.starts_with(b"{\"customers\""));
        // An empty response has no added headers.
        assert_eq!(names(recs[5].response.as_ref().unwrap()), [":status"]);
        assert_eq!(recs[6].store, StoreBehaviour::Timeout);
        assert_eq!(recs[6].expect.as_ref().unwrap().response.status, Some(503));
        assert!(recs
            .iter()
            .all(|r| r.warnings.is_empty() && r.name.is_some()));
    }

    #[test]
    fn json_files_read_the_same() {
        let (doc, _) = yamlpos::parse(FIXTURE).unwrap();
        let json_text = serde_json::to_string_pretty(&doc).unwrap();
        let a = load("x", FIXTURE).unwrap();
        let b = load("x", &json_text).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }

    #[test]
    fn headers_bodies_and_stores() {
        let text = r#"
consent_store: { status: 500 }
exchanges:
  - request:
      method: PUT
      path: /v1/customers/c-1
      authority: profile.acme.internal
      scheme: https
      headers: { X-Multi: [a, b], X-Num: 5, X-Flag: true, Transfer-Encoding: chunked }
      body_base64: |
        eyJh
        IjoxfQ==
      trailers: { grpc-status: "0" }
    response: { status: 404, body: null, headers: { Content-Type: application/problem+json } }
  - request: { path: /, authority: a, body: {} }
    consent_store: { answer: { c-1: { marketing_email: { granted: true } } } }
  - request: { path: /, authority: a }
    consent_store: { garbage: true }
  - request: { path: /, authority: a }
    consent_store: { down: true }
"#;
        let recs = load("t.yaml", text).unwrap();
        let r = &recs[0];
        assert_eq!(
            r.request.headers[4..],
            [
                ("x-multi".to_string(), "a".to_string()),
                ("x-multi".into(), "b".into()),
                ("x-num".into(), "5".into()),
                ("x-flag".into(), "true".into()),
                ("transfer-encoding".into(), "chunked".into()),
            ]
        );
        assert_eq!(r.request.body, br#"{"a":1}"#);
        assert_eq!(r.request.header(":scheme"), Some("https"));
        assert_eq!(
            r.request.trailers,
            [("grpc-status".to_string(), "0".to_string())]
        );
        let resp = r.response.as_ref().unwrap();
        assert_eq!(resp.body, b"null");
        assert_eq!(
            resp.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(resp.header("content-length"), Some("4"));
        assert_eq!(r.store, StoreBehaviour::Status(500));
        assert!(r.expect.is_none());
        assert_eq!(recs[1].request.body, b"{}");
        let StoreBehaviour::Answer(a) = &recs[1].store else {
            panic!()
        };
        assert!(a["c-1"]["marketing_email"]);
        assert_eq!(recs[2].store, StoreBehaviour::Garbage);
        assert_eq!(recs[3].store, StoreBehaviour::Down);
        assert_eq!(load("t", MIN).unwrap()[0].store, StoreBehaviour::default());
    }

    #[test]
    fn errors_name_the_place_and_the_fix() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "exchanges:\n  - request: { path: /v1/x, authority: a }\n    respnse: {}\n",
                "3:5",
                &["/exchanges/0/respnse", "unknown key `respnse`", "did you mean `response`", "allowed keys: name,"],
            ),
            (
                "exchanges:\n  - request:\n      authority: a\n",
                "3:7",
                &["/exchanges/0/request", "missing key `path`"],
            ),
            (
                "exchanges:\n  - request: { path: v1, authority: a }\n",
                "2:22",
                &["must start with /"],
            ),
            (
                "exchanges:\n  - request: { path: /, authority: a, body: 1, body_text: x }\n",
                "2:48",
                &["both `body` and `body_text`"],
            ),
            (
                "exchanges:\n  - request: { path: /, authority: a, body_base64: '***' }\n",
                "2:52",
                &["not valid base64"],
            ),
            (
                "exchanges:\n  - request: { path: /, authority: a }\n    response: { status: 99 }\n",
                "3:25",
                &["HTTP status", "the number 99"],
            ),
            (
                "exchanges:\n  - request: { path: /, authority: a }\n    expect: { request: { outcome: ok } }\n",
                "3:35",
                &["unknown outcome `ok`", "allowed, modified, blocked, uninspectable"],
            ),
            (
                "consent_store: { status: 500, down: true }\nexchanges: []\n",
                "1:16",
                &["/consent_store", "exactly one of"],
            ),
            (
                "consent_store: { timeout: false }\n",
                "1:27",
                &["`timeout: false` means nothing"],
            ),
            (
                "consent_store: { answer: { c-1: { k: yes } } }\n",
                "1:38",
                &["/consent_store/answer/c-1/k", "true, false"],
            ),
            (
                "exchanges:\n  - request: { path: /, authority: a, headers: { ':path': /x } }\n",
                "2:50",
                &["pseudo-header"],
            ),
            (
                "exchanges:\n  - request: { path: /, authority: a, headers: { x: [a, {b: c}] } }\n",
                "2:57",
                &["/exchanges/0/request/headers/x/1", "header value"],
            ),
            (
                "exchanges:\n  - request: { path: /, authority: a, headers: { x: ~ } }\n",
                "2:53",
                &["write \"\" for an empty value"],
            ),
            ("exchanges: []\n", "1:12", &["`exchanges` is empty"]),
            ("- a\n", "1:1", &["expected a mapping (a replay file), found a list"]),
            ("consent_store: { down: true }\n", "1:1", &["missing key `exchanges`"]),
            ("consent_store: {}\n", "1:16", &["has 0 keys"]),
            ("exchanges:\n  - request: { path: /, authority: a\n", "3:1", &["invalid YAML"]),
            ("{\"exchanges\": [}", "1:16", &["invalid JSON"]),
            (
                "exchanges:\n  - request: { path: /, authority: a }\n    name: 5\n",
                "3:11",
                &["expected a string, found the number 5"],
            ),
        ];
        for (text, at, needles) in cases {
            let e = load_err(text);
            assert_eq!(e.file, "t.yaml");
            assert_eq!(e.location.as_deref(), Some(*at), "{text}\n{e}");
            for n in *needles {
                assert!(e.message.contains(n), "{text}\n{e}\nmissing: {n}");
            }
        }
        let shown = load_err("exchanges: []\n").to_string();
        assert!(shown.starts_with("t.yaml:1:12: /exchanges: "), "{shown}");
    }

    #[test]
    fn typo_suggestions() {
        assert_eq!(closest("exchange", TOP_KEYS), Some("exchanges"));
        assert_eq!(closest("body_b64", REQUEST_KEYS), None);
        assert_eq!(closest("header", REQUEST_KEYS), Some("headers"));
        assert_eq!(closest("zzz", EXCHANGE_KEYS), None);
    }
}
