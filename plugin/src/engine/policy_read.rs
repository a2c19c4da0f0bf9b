//! Reading a policy document (format v1) into the [`PolicyFile`] types, by hand.
//!
//! A `serde` derive did this before. It stopped at the first problem, and its generated
//! code was the largest single part of the `.wasm` (issue 15: size and start-up). This
//! reader walks the parsed JSON value once and reports every problem it finds, each with
//! the JSON Pointer of the value to fix: an unknown key (with the keys allowed there and
//! the closest one), a missing key, a value of the wrong type or out of range, a name
//! that is not one of the allowed values. The filter (`Policy::compile`) and
//! `consentry check` both read policies through it, so they accept the same documents.
//!
//! The language is the one `policies/README.md` describes: every object refuses keys it
//! does not know; a key marked optional there may also be `null`, which means the same
//! as leaving it out; no other key may be `null`.

use super::compile::PolicyError;
use super::policy::{
    default_records, default_store_cache_ttl_s, default_store_path, default_store_timeout_ms,
    ActionSpec, CallerHeader, ConsentHeader, ConsentSources, ConsentStore, DirectionSpec, FailMode,
    FieldBinding, Identity, Keys, LegalBasis, Limits, LogOptions, MaskSpec, MessageBinding,
    MessageSubject, Mode, NamedBinding, PolicyFile, Purpose, Service, ShapeMismatch, Undeclared,
};
use super::positions::join;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Reads `doc` as a policy file; `Err` holds every problem, none of them positioned
/// (the caller knows the text and fills in lines and columns).
pub fn read_policy(doc: &Value) -> Result<PolicyFile, Vec<PolicyError>> {
    let mut r = Reader { errors: Vec::new() };
    let file = r.policy(doc);
    if r.errors.is_empty() {
        Ok(file)
    } else {
        Err(r.errors)
    }
}

struct Reader {
    errors: Vec<PolicyError>,
}

/// The JSON type of `v`, in words, with a short excerpt of a scalar.
fn found(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => {
            let cut: String = s.chars().take(40).collect();
            let more = if cut.len() < s.len() { "…" } else { "" };
            format!("the string \"{cut}{more}\"")
        }
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Edit distance, for "did you mean"; short keys only, so quadratic is fine.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn listed(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The closest of `names` to `word`, if close enough to be a likely typo.
fn closest<'n>(word: &str, names: &[&'n str]) -> Option<&'n str> {
    let limit = (word.chars().count() / 3).clamp(1, 3);
    names
        .iter()
        .map(|n| (distance(&word.to_ascii_lowercase(), n), *n))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, n)| n)
}

impl Reader {
    fn error(&mut self, pointer: impl Into<String>, message: impl Into<String>) {
        self.errors.push(PolicyError {
            pointer: pointer.into(),
            line: None,
            column: None,
            message: message.into(),
        });
    }

    fn wrong_type(&mut self, v: &Value, ptr: &str, expected: &str) {
        self.error(ptr, format!("expected {expected}, found {}", found(v)));
    }

    /// `v` as an object of `what` with only the `known` keys; unknown ones are reported.
    fn object<'v>(
        &mut self,
        v: &'v Value,
        ptr: &str,
        what: &str,
        known: &[&str],
    ) -> Option<&'v Map<String, Value>> {
        let Value::Object(m) = v else {
            self.wrong_type(v, ptr, &format!("an object ({what})"));
            return None;
        };
        for k in m.keys() {
            if !known.contains(&k.as_str()) {
                let hint = closest(k, known)
                    .map(|c| format!(" (did you mean `{c}`?)"))
                    .unwrap_or_default();
                self.error(
                    join(ptr, k),
                    format!(
                        "unknown field `{k}`{hint} in {what}; expected one of {}",
                        listed(known)
                    ),
                );
            }
        }
        Some(m)
    }

    /// A key that must be there.
    fn required<'v>(
        &mut self,
        m: &'v Map<String, Value>,
        ptr: &str,
        key: &str,
        what: &str,
    ) -> Option<&'v Value> {
        let v = m.get(key);
        if v.is_none() {
            self.error(ptr, format!("missing field `{key}`: {what}"));
        }
        v
    }

    /// An optional key: absent and `null` are the same.
    fn optional<'v>(m: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
        m.get(key).filter(|v| !v.is_null())
    }

    fn string(&mut self, v: &Value, ptr: &str) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            _ => {
                self.wrong_type(v, ptr, "a string");
                None
            }
        }
    }

    fn boolean(&mut self, v: &Value, ptr: &str) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            _ => {
                self.wrong_type(v, ptr, "`true` or `false`");
                None
            }
        }
    }

    /// A whole number from 0 to `max`.
    fn count(&mut self, v: &Value, ptr: &str, max: u64) -> Option<u64> {
        match v.as_u64() {
            Some(n) if n <= max => Some(n),
            Some(n) => {
                self.error(ptr, format!("{n} is too large; at most {max}"));
                None
            }
            None => {
                self.wrong_type(v, ptr, "a whole number, 0 or more");
                None
            }
        }
    }

    fn usize(&mut self, v: &Value, ptr: &str) -> Option<usize> {
        let max = u64::try_from(usize::MAX).unwrap_or(u64::MAX);
        self.count(v, ptr, max)
            .and_then(|n| usize::try_from(n).ok())
    }

    /// One of the names in `options`.
    fn choice<T: Clone>(
        &mut self,
        v: &Value,
        ptr: &str,
        what: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        let Value::String(s) = v else {
            self.wrong_type(v, ptr, &format!("one of {} ({what})", listed(&names)));
            return None;
        };
        if let Some((_, t)) = options.iter().find(|(n, _)| n == s) {
            return Some(t.clone());
        }
        let hint = closest(s, &names)
            .map(|c| format!(" (did you mean `{c}`?)"))
            .unwrap_or_default();
        self.error(
            ptr,
            format!(
                "unknown {what} `{s}`{hint}; expected one of {}",
                listed(&names)
            ),
        );
        None
    }

    fn list<T>(
        &mut self,
        v: &Value,
        ptr: &str,
        what: &str,
        mut item: impl FnMut(&mut Self, &Value, &str) -> Option<T>,
    ) -> Vec<T> {
        let Value::Array(a) = v else {
            self.wrong_type(v, ptr, &format!("an array ({what})"));
            return Vec::new();
        };
        a.iter()
            .enumerate()
            .filter_map(|(i, x)| item(self, x, &format!("{ptr}/{i}")))
            .collect()
    }

    fn strings(&mut self, v: &Value, ptr: &str, what: &str) -> Vec<String> {
        self.list(v, ptr, what, |r, x, p| r.string(x, p))
    }

    fn named<T>(
        &mut self,
        v: &Value,
        ptr: &str,
        what: &str,
        mut item: impl FnMut(&mut Self, &Value, &str) -> Option<T>,
    ) -> BTreeMap<String, T> {
        let Value::Object(m) = v else {
            self.wrong_type(v, ptr, &format!("an object ({what}, by name)"));
            return BTreeMap::new();
        };
        m.iter()
            .filter_map(|(k, x)| item(self, x, &join(ptr, k)).map(|t| (k.clone(), t)))
            .collect()
    }

    // -----------------------------------------------------------------------------------
    // The document

    fn policy(&mut self, v: &Value) -> PolicyFile {
        const KEYS: &[&str] = &[
            "consentry",
            "name",
            "mode",
            "fail",
            "undeclared",
            "default_action",
            "redact_marker",
            "limits",
            "keys",
            "log",
            "identity",
            "services",
            "purposes",
            "consent",
            "messages",
        ];
        let mut file = PolicyFile {
            consentry: 1,
            name: String::new(),
            mode: Mode::default(),
            fail: FailMode::default(),
            undeclared: Undeclared::default(),
            default_action: None,
            redact_marker: None,
            limits: Limits::default(),
            keys: Keys::default(),
            log: LogOptions::default(),
            identity: Identity::default(),
            services: BTreeMap::new(),
            purposes: BTreeMap::new(),
            consent: ConsentSources::default(),
            messages: Vec::new(),
        };
        let Some(m) = self.object(v, "", "the policy", KEYS) else {
            return file;
        };
        if let Some(x) = self.required(
            m,
            "",
            "consentry",
            "the format version; write `\"consentry\": 1`",
        ) {
            if let Some(n) = self.count(x, "/consentry", u64::from(u32::MAX)) {
                file.consentry = u32::try_from(n).unwrap_or(u32::MAX);
            }
        }
        if let Some(x) = self.required(
            m,
            "",
            "name",
            "the policy's name, reported in every decision log",
        ) {
            file.name = self.string(x, "/name").unwrap_or_default();
        }
        if let Some(x) = m.get("mode") {
            let options = [("enforce", Mode::Enforce), ("audit", Mode::Audit)];
            file.mode = self
                .choice(x, "/mode", "mode", &options)
                .unwrap_or_default();
        }
        if let Some(x) = m.get("fail") {
            let options = [("closed", FailMode::Closed), ("open", FailMode::Open)];
            file.fail = self
                .choice(x, "/fail", "fail mode", &options)
                .unwrap_or_default();
        }
        if let Some(x) = m.get("undeclared") {
            let options = [("allow", Undeclared::Allow), ("strip", Undeclared::Strip)];
            file.undeclared = self
                .choice(x, "/undeclared", "treatment of undeclared fields", &options)
                .unwrap_or_default();
        }
        if let Some(x) = Self::optional(m, "default_action") {
            file.default_action = self.action(x, "/default_action");
        }
        if let Some(x) = Self::optional(m, "redact_marker") {
            file.redact_marker = self.string(x, "/redact_marker");
        }
        if let Some(x) = m.get("limits") {
            file.limits = self.limits(x, "/limits");
        }
        if let Some(x) = m.get("keys") {
            file.keys = self.keys(x, "/keys");
        }
        if let Some(x) = m.get("log") {
            file.log = self.log(x, "/log");
        }
        if let Some(x) = m.get("identity") {
            file.identity = self.identity(x, "/identity");
        }
        if let Some(x) = self.required(m, "", "services", "the services of the mesh, by name") {
            file.services = self.named(x, "/services", "services", |r, s, p| r.service(s, p));
        }
        if let Some(x) = self.required(
            m,
            "",
            "purposes",
            "the purposes services process data for, by name",
        ) {
            file.purposes = self.named(x, "/purposes", "purposes", |r, s, p| r.purpose(s, p));
        }
        if let Some(x) = m.get("consent") {
            file.consent = self.consent(x, "/consent");
        }
        if let Some(x) = self.required(
            m,
            "",
            "messages",
            "the message bindings: where customer data sits in which messages",
        ) {
            file.messages = self.list(x, "/messages", "message bindings", |r, b, p| {
                r.binding(b, p)
            });
        }
        file
    }

    fn action(&mut self, v: &Value, ptr: &str) -> Option<ActionSpec> {
        match v {
            Value::String(_) => {
                let options = [
                    ("strip", ActionSpec::Strip),
                    ("redact", ActionSpec::Redact),
                    ("hash", ActionSpec::Hash),
                    ("block", ActionSpec::Block),
                ];
                let what = "action (`mask` is written {\"mask\": {...}})";
                self.choice(v, ptr, what, &options)
            }
            Value::Object(_) => {
                let m = self.object(v, ptr, "a `mask` action", &["mask"])?;
                let spec = self.required(
                    m,
                    ptr,
                    "mask",
                    "write {\"mask\": {\"keep_last\": 4}} or one of `strip`, `redact`, `hash`, `block`",
                )?;
                let mptr = join(ptr, "mask");
                let known = ["keep_first", "keep_last", "keep_domain"];
                let mm = self.object(spec, &mptr, "a mask", &known)?;
                // Read every key before giving up, so that each problem is reported.
                let n =
                    |r: &mut Self, key: &str| mm.get(key).map(|x| r.usize(x, &join(&mptr, key)));
                let keep_first = n(self, "keep_first");
                let keep_last = n(self, "keep_last");
                let keep_domain = mm
                    .get("keep_domain")
                    .map(|x| self.boolean(x, &join(&mptr, "keep_domain")));
                Some(ActionSpec::Mask(MaskSpec {
                    keep_first: keep_first.unwrap_or(Some(0))?,
                    keep_last: keep_last.unwrap_or(Some(0))?,
                    keep_domain: keep_domain.unwrap_or(Some(false))?,
                }))
            }
            _ => {
                self.wrong_type(
                    v,
                    ptr,
                    "an action: `strip`, `redact`, `hash`, `block` or {\"mask\": {...}}",
                );
                None
            }
        }
    }

    fn limits(&mut self, v: &Value, ptr: &str) -> Limits {
        let mut l = Limits::default();
        let known = ["max_body_bytes", "max_depth", "max_records"];
        let Some(m) = self.object(v, ptr, "`limits`", &known) else {
            return l;
        };
        if let Some(x) = m.get("max_body_bytes") {
            l.max_body_bytes = self
                .usize(x, &join(ptr, "max_body_bytes"))
                .unwrap_or(l.max_body_bytes);
        }
        if let Some(x) = m.get("max_depth") {
            l.max_depth = self
                .usize(x, &join(ptr, "max_depth"))
                .unwrap_or(l.max_depth);
        }
        if let Some(x) = m.get("max_records") {
            l.max_records = self
                .usize(x, &join(ptr, "max_records"))
                .unwrap_or(l.max_records);
        }
        l
    }

    fn keys(&mut self, v: &Value, ptr: &str) -> Keys {
        let mut k = Keys::default();
        let known = ["hash_key_env", "subject_key_env"];
        let Some(m) = self.object(v, ptr, "`keys`", &known) else {
            return k;
        };
        if let Some(x) = m.get("hash_key_env") {
            k.hash_key_env = self
                .string(x, &join(ptr, "hash_key_env"))
                .unwrap_or(k.hash_key_env);
        }
        if let Some(x) = m.get("subject_key_env") {
            k.subject_key_env = self
                .string(x, &join(ptr, "subject_key_env"))
                .unwrap_or(k.subject_key_env);
        }
        k
    }

    fn log(&mut self, v: &Value, ptr: &str) -> LogOptions {
        let mut o = LogOptions::default();
        let Some(m) = self.object(v, ptr, "`log`", &["untouched", "every_field"]) else {
            return o;
        };
        if let Some(x) = m.get("untouched") {
            o.untouched = self.boolean(x, &join(ptr, "untouched")).unwrap_or_default();
        }
        if let Some(x) = m.get("every_field") {
            o.every_field = self
                .boolean(x, &join(ptr, "every_field"))
                .unwrap_or_default();
        }
        o
    }

    fn identity(&mut self, v: &Value, ptr: &str) -> Identity {
        let mut id = Identity::default();
        let Some(m) = self.object(v, ptr, "`identity`", &["caller_header"]) else {
            return id;
        };
        if let Some(x) = Self::optional(m, "caller_header") {
            id.caller_header = self.caller_header(x, &join(ptr, "caller_header"));
        }
        id
    }

    fn caller_header(&mut self, v: &Value, ptr: &str) -> Option<CallerHeader> {
        if let Value::String(name) = v {
            self.error(
                ptr,
                format!("identity.caller_header is an object now, so that it says who may assert a caller: write {{\"name\": \"{name}\", \"trusted_from\": [\"gateway\"]}} naming the services (an edge gateway) allowed to send it; a bare header name let any caller claim another's identity"),
            );
            return None;
        }
        let known = ["name", "trusted_from", "trust_plaintext"];
        let m = self.object(v, ptr, "`identity.caller_header`", &known)?;
        let name = self.required(m, ptr, "name", "the header that names the caller")?;
        let name = self.string(name, &join(ptr, "name"))?;
        let trusted_from = m
            .get("trusted_from")
            .map(|x| self.strings(x, &join(ptr, "trusted_from"), "service names"))
            .unwrap_or_default();
        let trust_plaintext = m
            .get("trust_plaintext")
            .and_then(|x| self.boolean(x, &join(ptr, "trust_plaintext")))
            .unwrap_or_default();
        Some(CallerHeader {
            name,
            trusted_from,
            trust_plaintext,
        })
    }

    fn service(&mut self, v: &Value, ptr: &str) -> Option<Service> {
        let known = [
            "clusters",
            "authorities",
            "principals",
            "purposes",
            "case_sensitive_paths",
        ];
        let m = self.object(v, ptr, "a service", &known)?;
        let list = |r: &mut Self, key: &str, what: &str| {
            m.get(key)
                .map(|x| r.strings(x, &join(ptr, key), what))
                .unwrap_or_default()
        };
        Some(Service {
            clusters: list(self, "clusters", "Envoy cluster names"),
            authorities: list(self, "authorities", "`:authority` values"),
            principals: list(self, "principals", "SPIFFE principals"),
            purposes: list(self, "purposes", "purpose names"),
            case_sensitive_paths: m
                .get("case_sensitive_paths")
                .and_then(|x| self.boolean(x, &join(ptr, "case_sensitive_paths")))
                .unwrap_or_default(),
        })
    }

    fn purpose(&mut self, v: &Value, ptr: &str) -> Option<Purpose> {
        let known = ["basis", "consent_key", "allows", "description"];
        let m = self.object(v, ptr, "a purpose", &known)?;
        let basis = self.required(
            m,
            ptr,
            "basis",
            "the purpose's legal basis (GDPR Art. 6(1))",
        );
        let options = [
            ("consent", LegalBasis::Consent),
            ("contract", LegalBasis::Contract),
            ("legal_obligation", LegalBasis::LegalObligation),
            ("vital_interests", LegalBasis::VitalInterests),
            ("public_task", LegalBasis::PublicTask),
            ("legitimate_interests", LegalBasis::LegitimateInterests),
        ];
        let basis =
            basis.and_then(|x| self.choice(x, &join(ptr, "basis"), "legal basis", &options));
        let consent_key = Self::optional(m, "consent_key")
            .and_then(|x| self.string(x, &join(ptr, "consent_key")));
        let allows = self
            .required(
                m,
                ptr,
                "allows",
                "the data categories this purpose may receive",
            )
            .map(|x| self.strings(x, &join(ptr, "allows"), "data categories"));
        let description = Self::optional(m, "description")
            .and_then(|x| self.string(x, &join(ptr, "description")));
        Some(Purpose {
            basis: basis?,
            consent_key,
            allows: allows?,
            description,
        })
    }

    fn consent(&mut self, v: &Value, ptr: &str) -> ConsentSources {
        let mut c = ConsentSources::default();
        let Some(m) = self.object(v, ptr, "`consent`", &["header", "store"]) else {
            return c;
        };
        if let Some(x) = Self::optional(m, "header") {
            let hptr = join(ptr, "header");
            if let Some(h) = self.object(x, &hptr, "`consent.header`", &["name", "trusted_callers"])
            {
                let name = self
                    .required(h, &hptr, "name", "the header that carries the consents")
                    .and_then(|n| self.string(n, &join(&hptr, "name")));
                let trusted = self
                    .required(
                        h,
                        &hptr,
                        "trusted_callers",
                        "the services whose requests may carry it",
                    )
                    .map(|t| self.strings(t, &join(&hptr, "trusted_callers"), "service names"));
                if let (Some(name), Some(trusted_callers)) = (name, trusted) {
                    c.header = Some(ConsentHeader {
                        name,
                        trusted_callers,
                    });
                }
            }
        }
        if let Some(x) = Self::optional(m, "store") {
            c.store = self.store(x, &join(ptr, "store"));
        }
        c
    }

    fn store(&mut self, v: &Value, ptr: &str) -> Option<ConsentStore> {
        let known = ["cluster", "authority", "path", "timeout_ms", "cache_ttl_s"];
        let m = self.object(v, ptr, "`consent.store`", &known)?;
        let cluster = self
            .required(m, ptr, "cluster", "the Envoy cluster of the consent store")
            .and_then(|x| self.string(x, &join(ptr, "cluster")));
        let mut s = ConsentStore {
            cluster: String::new(),
            authority: Self::optional(m, "authority")
                .and_then(|x| self.string(x, &join(ptr, "authority"))),
            path: default_store_path(),
            timeout_ms: default_store_timeout_ms(),
            cache_ttl_s: default_store_cache_ttl_s(),
        };
        if let Some(x) = m.get("path") {
            s.path = self.string(x, &join(ptr, "path")).unwrap_or(s.path);
        }
        if let Some(x) = m.get("timeout_ms") {
            s.timeout_ms = self
                .count(x, &join(ptr, "timeout_ms"), u64::MAX)
                .unwrap_or(s.timeout_ms);
        }
        if let Some(x) = m.get("cache_ttl_s") {
            s.cache_ttl_s = self
                .count(x, &join(ptr, "cache_ttl_s"), u64::MAX)
                .unwrap_or(s.cache_ttl_s);
        }
        s.cluster = cluster?;
        Some(s)
    }

    fn binding(&mut self, v: &Value, ptr: &str) -> Option<MessageBinding> {
        let known = [
            "name",
            "paths",
            "methods",
            "direction",
            "records",
            "subject",
            "consent",
            "fields",
            "message_subject",
            "headers",
            "query",
            "shape_mismatch",
        ];
        let m = self.object(v, ptr, "a message binding", &known)?;
        let at = |key: &str| join(ptr, key);
        let name = self
            .required(
                m,
                ptr,
                "name",
                "the binding's name, reported in decision logs",
            )
            .and_then(|x| self.string(x, &at("name")));
        let mut b = MessageBinding {
            name: String::new(),
            paths: Vec::new(),
            methods: Vec::new(),
            direction: DirectionSpec::default(),
            records: default_records(),
            subject: None,
            consent: None,
            fields: Vec::new(),
            message_subject: None,
            headers: Vec::new(),
            query: Vec::new(),
            shape_mismatch: ShapeMismatch::default(),
        };
        if let Some(x) = m.get("paths") {
            b.paths = self.strings(x, &at("paths"), "path prefixes");
        }
        if let Some(x) = m.get("methods") {
            b.methods = self.strings(x, &at("methods"), "HTTP methods");
        }
        if let Some(x) = m.get("direction") {
            let options = [
                ("both", DirectionSpec::Both),
                ("request", DirectionSpec::Request),
                ("response", DirectionSpec::Response),
            ];
            b.direction = self
                .choice(x, &at("direction"), "direction", &options)
                .unwrap_or_default();
        }
        if let Some(x) = m.get("records") {
            b.records = self.string(x, &at("records")).unwrap_or(b.records);
        }
        if let Some(x) = Self::optional(m, "subject") {
            b.subject = self.string(x, &at("subject"));
        }
        if let Some(x) = Self::optional(m, "consent") {
            b.consent = self.string(x, &at("consent"));
        }
        if let Some(x) = m.get("fields") {
            b.fields = self.list(x, &at("fields"), "field bindings", |r, f, p| r.field(f, p));
        }
        if let Some(x) = Self::optional(m, "message_subject") {
            b.message_subject = self.message_subject(x, &at("message_subject"));
        }
        if let Some(x) = m.get("headers") {
            b.headers = self.list(x, &at("headers"), "header bindings", |r, n, p| {
                r.named_binding(n, p, "a header binding")
            });
        }
        if let Some(x) = m.get("query") {
            b.query = self.list(x, &at("query"), "query parameter bindings", |r, n, p| {
                r.named_binding(n, p, "a query parameter binding")
            });
        }
        if let Some(x) = m.get("shape_mismatch") {
            let options = [
                ("refuse", ShapeMismatch::Refuse),
                ("pass", ShapeMismatch::Pass),
            ];
            b.shape_mismatch = self
                .choice(
                    x,
                    &at("shape_mismatch"),
                    "shape_mismatch treatment",
                    &options,
                )
                .unwrap_or_default();
        }
        b.name = name?;
        Some(b)
    }

    fn field(&mut self, v: &Value, ptr: &str) -> Option<FieldBinding> {
        let m = self.object(v, ptr, "a field binding", &["path", "category", "action"])?;
        let path = self
            .required(m, ptr, "path", "the JSONPath of the field, from the record")
            .and_then(|x| self.string(x, &join(ptr, "path")));
        let category = self
            .required(m, ptr, "category", "the field's data category")
            .and_then(|x| self.string(x, &join(ptr, "category")));
        let action = Self::optional(m, "action").and_then(|x| self.action(x, &join(ptr, "action")));
        Some(FieldBinding {
            path: path?,
            category: category?,
            action,
        })
    }

    fn named_binding(&mut self, v: &Value, ptr: &str, what: &str) -> Option<NamedBinding> {
        let known = ["name", "category", "action", "case_sensitive"];
        let m = self.object(v, ptr, what, &known)?;
        let name = self
            .required(m, ptr, "name", "the header or parameter name")
            .and_then(|x| self.string(x, &join(ptr, "name")));
        let category = self
            .required(m, ptr, "category", "its data category")
            .and_then(|x| self.string(x, &join(ptr, "category")));
        let action = Self::optional(m, "action").and_then(|x| self.action(x, &join(ptr, "action")));
        let case_sensitive = m
            .get("case_sensitive")
            .and_then(|x| self.boolean(x, &join(ptr, "case_sensitive")))
            .unwrap_or_default();
        Some(NamedBinding {
            name: name?,
            category: category?,
            action,
            case_sensitive,
        })
    }

    fn message_subject(&mut self, v: &Value, ptr: &str) -> Option<MessageSubject> {
        let m = self.object(v, ptr, "`message_subject`", &["header", "query"])?;
        let mut found = m.iter().filter(|(k, _)| *k == "header" || *k == "query");
        match (found.next(), found.next()) {
            (Some((k, x)), None) => {
                let name = self.string(x, &join(ptr, k))?;
                Some(if k == "header" {
                    MessageSubject::Header(name)
                } else {
                    MessageSubject::Query(name)
                })
            }
            (None, _) if m.is_empty() => {
                self.error(
                    ptr,
                    "write exactly one of {\"header\": NAME} or {\"query\": NAME}",
                );
                None
            }
            (Some(_), Some(_)) => {
                self.error(
                    ptr,
                    "write exactly one of {\"header\": NAME} or {\"query\": NAME}, not both",
                );
                None
            }
            // Only unknown keys, reported by `object`.
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn minimal() -> Value {
        json!({
            "consentry": 1,
            "name": "p",
            "services": { "crm": { "clusters": ["crm"] } },
            "purposes": { "ops": { "basis": "contract", "allows": ["user"] } },
            "messages": [{ "name": "m", "fields": [{ "path": "$.email", "category": "user.contact.email" }] }]
        })
    }

    fn errors(doc: Value) -> Vec<(String, String)> {
        read_policy(&doc)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.pointer, e.message))
            .collect()
    }

    #[test]
    fn defaults_are_those_of_the_reference() {
        let f = read_policy(&minimal()).unwrap();
        assert_eq!(
            (f.mode, f.fail, f.undeclared),
            (Mode::Enforce, FailMode::Closed, Undeclared::Allow)
        );
        assert_eq!(
            (
                f.limits.max_body_bytes,
                f.limits.max_depth,
                f.limits.max_records
            ),
            (1024 * 1024, 64, 10_000)
        );
        assert_eq!(f.keys.hash_key_env, "CONSENTRY_HASH_KEY");
        assert_eq!(f.keys.subject_key_env, "CONSENTRY_SUBJECT_KEY");
        let b = &f.messages[0];
        assert_eq!(
            (b.records.as_str(), b.direction, b.shape_mismatch),
            ("$", DirectionSpec::Both, ShapeMismatch::Refuse)
        );
        assert!(b.paths.is_empty() && b.methods.is_empty() && b.fields[0].action.is_none());
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_pointer() {
        let mut doc = minimal();
        doc["servces"] = json!({});
        doc["mode"] = json!("enforcing");
        doc["limits"] = json!({ "max_depth": -1 });
        doc["purposes"]["ops"]["basis"] = json!("consnet");
        doc["messages"][0]["fields"][0]
            .as_object_mut()
            .unwrap()
            .remove("category");
        doc["messages"][0]["fields"][0]["action"] = json!({ "mask": { "keep_last": "4" } });
        let got = errors(doc);
        let pointers: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            pointers,
            [
                "/servces",
                "/mode",
                "/limits/max_depth",
                "/purposes/ops/basis",
                "/messages/0/fields/0",
                "/messages/0/fields/0/action/mask/keep_last",
            ],
            "{got:#?}"
        );
        let msg = |i: usize| got[i].1.as_str();
        assert!(
            msg(0).starts_with("unknown field `servces` (did you mean `services`?)"),
            "{}",
            msg(0)
        );
        assert!(
            msg(1).contains("unknown mode `enforcing`") && msg(1).contains("`enforce`, `audit`"),
            "{}",
            msg(1)
        );
        assert!(
            msg(2).contains("expected a whole number, 0 or more, found the number -1"),
            "{}",
            msg(2)
        );
        assert!(msg(3).contains("(did you mean `consent`?)"), "{}", msg(3));
        assert!(msg(4).starts_with("missing field `category`"), "{}", msg(4));
        assert!(msg(5).contains("found the string \"4\""), "{}", msg(5));
    }

    #[test]
    fn optional_keys_may_be_null_and_others_may_not() {
        let mut doc = minimal();
        doc["default_action"] = Value::Null;
        doc["messages"][0]["subject"] = Value::Null;
        assert!(read_policy(&doc).is_ok());
        doc["messages"][0]["paths"] = Value::Null;
        assert_eq!(
            errors(doc),
            [(
                "/messages/0/paths".to_string(),
                "expected an array (path prefixes), found null".to_string()
            )]
        );
    }

    #[test]
    fn actions_subjects_and_caller_headers_in_every_form() {
        let mut doc = minimal();
        doc["default_action"] = json!("hash");
        doc["messages"][0]["fields"][0]["action"] =
            json!({ "mask": { "keep_first": 1, "keep_domain": true } });
        doc["messages"][0]["message_subject"] = json!({ "query": "customer" });
        doc["identity"] =
            json!({ "caller_header": { "name": "x-caller", "trusted_from": ["gw"] } });
        let f = read_policy(&doc).unwrap();
        assert_eq!(f.default_action, Some(ActionSpec::Hash));
        assert_eq!(
            f.messages[0].fields[0].action,
            Some(ActionSpec::Mask(MaskSpec {
                keep_first: 1,
                keep_last: 0,
                keep_domain: true
            }))
        );
        assert!(
            matches!(&f.messages[0].message_subject, Some(MessageSubject::Query(q)) if q == "customer")
        );
        assert_eq!(f.identity.caller_header.unwrap().trusted_from, ["gw"]);

        doc["default_action"] = json!("mask");
        doc["messages"][0]["message_subject"] = json!({ "query": "a", "header": "b" });
        doc["identity"] = json!({ "caller_header": "x-caller" });
        let got = errors(doc);
        assert_eq!(got.len(), 3, "{got:#?}");
        assert!(
            got[0]
                .1
                .contains("unknown action (`mask` is written {\"mask\": {...}}) `mask`"),
            "{}",
            got[0].1
        );
        assert!(got[1].1.contains("is an object now"), "{}", got[1].1);
        assert!(got[2].1.contains("not both"), "{}", got[2].1);
    }

    #[test]
    fn not_an_object_and_out_of_range() {
        assert_eq!(
            errors(json!([])),
            [(
                String::new(),
                "expected an object (the policy), found an array".to_string()
            )]
        );
        let mut doc = minimal();
        doc["consentry"] = json!(1u64 << 40);
        assert!(errors(doc)[0].1.contains("too large; at most 4294967295"));
    }
}
