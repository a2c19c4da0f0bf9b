//! Property tests of the policy engine (issue "Hardening").
//!
//! Policies are generated within format v1 (services, purposes of every legal basis,
//! categories from a small dotted vocabulary with parents, field selectors by name,
//! union, wildcard, index and `..`, every action, undeclared allow/strip) and bodies are
//! generated in the shape of customer batches. Every string leaf of a body is a unique
//! marker (`~v17~`), so a value that leaks can be found in the output bytes.
//!
//! Properties:
//! - (a) no denied value reaches the recipient: a marker below a node decided `strip`,
//!   `redact`, `hash` or `mask` is not in the forwarded bytes; each action has its shape;
//! - (b) enforce changes only what the decisions name; audit decides exactly as enforce
//!   does and is never enforced (the glue forwards the input unchanged);
//! - (c) an unknown recipient gets no declared field unchanged (declared is computed here,
//!   independently of the engine);
//! - (d) no input makes the engine panic; what cannot be inspected gets a reason;
//! - (e) the same input gives the same output, also from a second compilation;
//! - (f) the streaming path agrees with the tree path it replaced (kept natively as its
//!   oracle, `Policy::plan_body_tree`): the same refusal, consent lookups and decisions,
//!   a semantically equal output, and the input byte for byte where nothing changed; on
//!   bodies respelled with other whitespace, escapes, number forms and member order, and
//!   on hostile bodies.
//!
//! `PROPTEST_CASES` scales every property (CI uses the defaults below).

use consentry::engine::push_path_key as push_key;
use consentry::engine::{
    ConsentAnswer, DecisionLog, Direction, Exchange, HeaderVerdict, Policy, Report, StoreAnswers,
    Uninspectable, UninspectableKind,
};
use proptest::prelude::*;
use proptest::sample::select;
mod common;
use common::config;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

// ---------------------------------------------------------------------------------------
// Vocabulary

const HASH_KEY: &str = "prop-hash-key-0123456789abcdef";
const SUBJECT_KEY: &str = "prop-subject-key-0123456789abcdef";

fn env(name: &str) -> Option<String> {
    match name {
        "CONSENTRY_HASH_KEY" => Some(HASH_KEY.into()),
        "CONSENTRY_SUBJECT_KEY" => Some(SUBJECT_KEY.into()),
        _ => None,
    }
}

const CATEGORIES: &[&str] = &[
    "user",
    "user.contact",
    "user.contact.email",
    "user.contact.phone",
    "user.contacts",
    "user.name",
    "user.financial",
    "user.financial.iban",
    "user.demographic",
    "user.demographic.age",
];
const BASES: &[&str] = &[
    "consent",
    "contract",
    "legal_obligation",
    "vital_interests",
    "public_task",
    "legitimate_interests",
];
const CONSENT_KEYS: &[&str] = &["k1", "k2", "k3"];
const SERVICES: &[&str] = &["svc-a", "svc-b", "svc-c", "svc-d"];
const PURPOSES: &[&str] = &["p.one", "p.two", "p.three", "p.four"];
/// Names the field selectors use; documents use them too, plus a few others.
const NAMES: &[&str] = &[
    "email", "name", "phone", "iban", "age", "address", "tags", "profile", "id", "consents", "city",
];
const DOC_KEYS: &[&str] = &[
    "email", "name", "phone", "iban", "age", "address", "tags", "profile", "city", "note", "x-y",
    "Email", "PHONE", "misc", "émail", "名前", "ID", "Id", "CONSENTS",
];
const SUBJECTS: &[&str] = &["c-1", "c-2", "c-3"];
const MARKERS: &[&str] = &["[redacted]", "XX", "<gone>"];

// ---------------------------------------------------------------------------------------
// Selectors: generated in a structured form, rendered as JSONPath for the policy and
// matched here (the oracle of property (c)) without the engine.

#[derive(Debug, Clone)]
enum Seg {
    /// One name (dotted or bracketed) or a union of names.
    Names(Vec<&'static str>, bool),
    Index(i64),
    Wild,
    /// `..` before a names or wildcard segment.
    Desc(Box<Seg>),
}

fn render_seg(s: &Seg, out: &mut String) {
    match s {
        Seg::Names(ns, bracket) => {
            if ns.len() == 1 && !bracket {
                out.push('.');
                out.push_str(ns[0]);
            } else {
                let quoted: Vec<String> = ns.iter().map(|n| format!("'{n}'")).collect();
                out.push('[');
                out.push_str(&quoted.join(","));
                out.push(']');
            }
        }
        Seg::Index(i) => out.push_str(&format!("[{i}]")),
        Seg::Wild => out.push_str("[*]"),
        Seg::Desc(inner) => {
            out.push_str("..");
            match &**inner {
                Seg::Names(ns, false) if ns.len() == 1 => out.push_str(ns[0]),
                Seg::Wild => out.push('*'),
                other => render_seg(other, out),
            }
        }
    }
}

fn render(sel: &[Seg]) -> String {
    let mut s = String::from("$");
    for seg in sel {
        render_seg(seg, &mut s);
    }
    s
}

#[derive(Clone, Copy)]
enum Edge<'a> {
    Key(&'a str),
    Index(usize, usize),
}

fn atom_matches(s: &Seg, e: Edge<'_>) -> bool {
    match (s, e) {
        (Seg::Wild, _) => true,
        // Names match in any ASCII case: a recipient may read `Email` as `email`.
        (Seg::Names(ns, _), Edge::Key(k)) => ns.iter().any(|n| n.eq_ignore_ascii_case(k)),
        (Seg::Index(i), Edge::Index(at, len)) => {
            if *i >= 0 {
                *i as usize == at
            } else {
                let back = i.unsigned_abs() as usize;
                back <= len && len - back == at
            }
        }
        (Seg::Desc(inner), e) => atom_matches(inner, e),
        _ => false,
    }
}

fn advance(sel: &[Seg], pos: usize, e: Edge<'_>, out: &mut Vec<usize>) {
    let Some(seg) = sel.get(pos) else { return };
    if matches!(seg, Seg::Desc(_)) {
        out.push(pos);
    }
    if atom_matches(seg, e) {
        out.push(pos + 1);
    }
}

// ---------------------------------------------------------------------------------------
// Generated policies

#[derive(Debug, Clone)]
enum Act {
    Strip,
    Redact,
    Hash,
    Block,
    Mask(usize, usize, bool),
}

impl Act {
    fn json(&self) -> Value {
        match self {
            Act::Strip => json!("strip"),
            Act::Redact => json!("redact"),
            Act::Hash => json!("hash"),
            Act::Block => json!("block"),
            Act::Mask(f, l, d) => {
                json!({ "mask": { "keep_first": f, "keep_last": l, "keep_domain": d } })
            }
        }
    }
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        3 => Just(Act::Strip),
        2 => Just(Act::Redact),
        2 => Just(Act::Hash),
        1 => Just(Act::Block),
        2 => (0usize..=6, 0usize..=6, any::<bool>()).prop_map(|(f, l, d)| Act::Mask(f, l, d)),
    ]
}

fn name_seg() -> impl Strategy<Value = Seg> {
    (
        prop::collection::vec(select(NAMES), 1..=2),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(mut ns, bracket)| {
            ns.dedup();
            Seg::Names(ns, bracket)
        })
}

fn seg() -> impl Strategy<Value = Seg> {
    prop_oneof![
        6 => name_seg(),
        1 => (-2i64..3).prop_map(Seg::Index),
        1 => Just(Seg::Wild),
        2 => prop_oneof![4 => name_seg(), 1 => Just(Seg::Wild)].prop_map(|s| Seg::Desc(Box::new(s))),
    ]
}

#[derive(Debug, Clone)]
struct FieldGen {
    sel: Vec<Seg>,
    category: &'static str,
    action: Option<Act>,
}

fn field() -> impl Strategy<Value = FieldGen> {
    (
        prop::collection::vec(seg(), 1..=3),
        select(CATEGORIES),
        prop::option::weighted(0.7, act()),
    )
        .prop_map(|(sel, category, action)| FieldGen {
            sel,
            category,
            action,
        })
}

#[derive(Debug, Clone)]
struct PurposeGen {
    basis: &'static str,
    key: &'static str,
    allows: Vec<&'static str>,
}

fn purpose() -> impl Strategy<Value = PurposeGen> {
    (
        select(BASES),
        select(CONSENT_KEYS),
        prop::collection::vec(select(CATEGORIES), 1..=3),
    )
        .prop_map(|(basis, key, allows)| PurposeGen { basis, key, allows })
}

#[derive(Debug, Clone)]
struct Options {
    undeclared_strip: bool,
    records_root: bool,
    subject: bool,
    consent: bool,
    default_action: Option<Act>,
    redact_marker: Option<&'static str>,
    header_consent: bool,
    store: bool,
    max_depth: Option<usize>,
    max_records: Option<usize>,
    max_body_bytes: Option<usize>,
    fail_open: bool,
}

fn options() -> impl Strategy<Value = Options> {
    (
        (
            any::<bool>(),
            prop::bool::weighted(0.25),
            prop::bool::weighted(0.8),
            prop::bool::weighted(0.8),
            prop::option::weighted(0.3, act()),
            prop::option::weighted(0.3, select(MARKERS)),
        ),
        (
            any::<bool>(),
            any::<bool>(),
            prop::option::weighted(0.15, select(&[3usize, 4, 5][..])),
            prop::option::weighted(0.1, Just(2usize)),
            prop::option::weighted(0.05, Just(300usize)),
            prop::bool::weighted(0.2),
        ),
    )
        .prop_map(
            |(
                (undeclared_strip, records_root, subject, consent, default_action, redact_marker),
                (header_consent, store, max_depth, max_records, max_body_bytes, fail_open),
            )| Options {
                undeclared_strip,
                records_root,
                subject,
                consent,
                default_action,
                redact_marker,
                header_consent,
                store,
                max_depth,
                max_records,
                max_body_bytes,
                fail_open,
            },
        )
}

#[derive(Debug, Clone)]
struct PolicyGen {
    purposes: Vec<PurposeGen>,
    /// Per service, indexes into `purposes` (taken modulo their number).
    services: Vec<Vec<usize>>,
    fields: Vec<FieldGen>,
    header: Option<(&'static str, Option<Act>)>,
    query: Option<(&'static str, Option<Act>)>,
    opts: Options,
}

fn policy_gen() -> impl Strategy<Value = PolicyGen> {
    (
        prop::collection::vec(purpose(), 1..=4),
        prop::collection::vec(prop::collection::vec(0usize..4, 0..=3), 1..=4),
        prop::collection::vec(field(), 1..=5),
        prop::option::weighted(0.5, (select(CATEGORIES), prop::option::of(act()))),
        prop::option::weighted(0.5, (select(CATEGORIES), prop::option::of(act()))),
        options(),
    )
        .prop_map(
            |(purposes, services, fields, header, query, opts)| PolicyGen {
                purposes,
                services,
                fields,
                header,
                query,
                opts,
            },
        )
}

impl PolicyGen {
    fn service_names(&self) -> Vec<&'static str> {
        SERVICES[..self.services.len()].to_vec()
    }

    fn to_json(&self, mode: &str) -> Value {
        let o = &self.opts;
        let mut purposes = Map::new();
        for (i, p) in self.purposes.iter().enumerate() {
            let mut v = json!({ "basis": p.basis, "allows": p.allows });
            if p.basis == "consent" {
                v["consent_key"] = json!(p.key);
            }
            purposes.insert(PURPOSES[i].to_string(), v);
        }
        let mut services = Map::new();
        for (i, ps) in self.services.iter().enumerate() {
            let mut names: Vec<&str> = Vec::new();
            for &p in ps {
                let n = PURPOSES[p % self.purposes.len()];
                if !names.contains(&n) {
                    names.push(n);
                }
            }
            let name = SERVICES[i];
            services.insert(
                name.to_string(),
                json!({
                    "clusters": [name],
                    "principals": [format!("spiffe://t/{name}")],
                    "purposes": names,
                }),
            );
        }
        let fields: Vec<Value> = self
            .fields
            .iter()
            .map(|f| {
                let mut v = json!({ "path": render(&f.sel), "category": f.category });
                if let Some(a) = &f.action {
                    v["action"] = a.json();
                }
                v
            })
            .collect();
        let named = |n: &str, b: &(&str, Option<Act>)| {
            let mut v = json!({ "name": n, "category": b.0 });
            if let Some(a) = &b.1 {
                v["action"] = a.json();
            }
            v
        };
        let mut binding = json!({
            "name": "batch",
            "paths": ["/v1/customers"],
            "records": if o.records_root { "$" } else { "$.customers[*]" },
            "fields": fields,
            "message_subject": { "header": "x-subject" },
            "headers": self.header.iter().map(|h| named("x-email", h)).collect::<Vec<_>>(),
            "query": self.query.iter().map(|q| named("email", q)).collect::<Vec<_>>(),
        });
        if o.subject {
            binding["subject"] = json!("$.id");
        }
        if o.consent {
            binding["consent"] = json!("$.consents");
        }
        let mut p = json!({
            "consentry": 1,
            "name": "prop-policy",
            "mode": mode,
            "fail": if o.fail_open { "open" } else { "closed" },
            "undeclared": if o.undeclared_strip { "strip" } else { "allow" },
            "identity": { "caller_header": { "name": "x-caller", "trust_plaintext": true } },
            "services": services,
            "purposes": purposes,
            "messages": [binding],
        });
        if let Some(a) = &o.default_action {
            p["default_action"] = a.json();
        }
        if let Some(m) = o.redact_marker {
            p["redact_marker"] = json!(m);
        }
        let mut limits = Map::new();
        if let Some(d) = o.max_depth {
            limits.insert("max_depth".into(), json!(d));
        }
        if let Some(r) = o.max_records {
            limits.insert("max_records".into(), json!(r));
        }
        if let Some(b) = o.max_body_bytes {
            limits.insert("max_body_bytes".into(), json!(b));
        }
        p["limits"] = Value::Object(limits);
        let mut consent = Map::new();
        if o.header_consent {
            consent.insert(
                "header".into(),
                json!({ "name": "x-consent", "trusted_callers": [SERVICES[0]] }),
            );
        }
        if o.store {
            consent.insert("store".into(), json!({ "cluster": "consent-store" }));
        }
        p["consent"] = Value::Object(consent);
        p
    }

    fn redact_marker(&self) -> &'static str {
        self.opts.redact_marker.unwrap_or("[redacted]")
    }

    /// The policy, its records naming each node by its concrete path (so the oracle can
    /// find what every decision is about).
    fn compile(&self, mode: &str) -> Policy {
        self.compile_templated(mode).with_exact_paths()
    }

    /// The policy as the filter runs it: records with path templates.
    fn compile_templated(&self, mode: &str) -> Policy {
        let text = self.to_json(mode).to_string();
        Policy::compile(text.as_bytes(), &env)
            .unwrap_or_else(|e| panic!("generated policy does not compile: {e}\n{text}"))
    }
}

// ---------------------------------------------------------------------------------------
// Generated documents. `"M"` and `"M@x.io"` are placeholders, numbered afterwards into
// unique markers `~v<n>~`.

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => Just(json!("M")),
        2 => Just(json!("M@x.io")),
        1 => (-1000i64..1000).prop_map(|n| json!(n)),
        1 => (-400i64..400).prop_map(|n| json!(n as f64 / 4.0)),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => Just(Value::Null),
    ]
}

fn tree() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(2, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..=3).prop_map(Value::Array),
            prop::collection::vec((select(DOC_KEYS), inner), 0..=3).prop_map(|kv| Value::Object(
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

fn consent_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(true)),
        Just(json!(false)),
        Just(json!({ "granted": true })),
        Just(json!({ "granted": false })),
        Just(json!("yes")),
        Just(Value::Null),
        Just(json!(1)),
    ]
}

fn record() -> impl Strategy<Value = Value> {
    let id = prop_oneof![
        3 => select(SUBJECTS).prop_map(|s| json!(s)),
        1 => (1i64..4).prop_map(|n| json!(n)),
        1 => Just(json!("")),
        1 => Just(json!({ "a": 1 })),
    ];
    let consents = prop_oneof![
        4 => prop::collection::vec((select(&["k1", "k2", "k3", "zz"][..]), consent_value()), 0..=3)
            .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        1 => Just(json!("all")),
        1 => Just(json!([true])),
    ];
    (
        prop::option::weighted(0.8, id),
        prop::option::weighted(0.7, consents),
        prop::collection::vec((select(DOC_KEYS), tree()), 0..=6),
    )
        .prop_map(|(id, consents, kv)| {
            let mut m = Map::new();
            if let Some(id) = id {
                m.insert("id".into(), id);
            }
            for (k, v) in kv {
                m.insert(k.to_string(), v);
            }
            if let Some(c) = consents {
                m.insert("consents".into(), c);
            }
            Value::Object(m)
        })
}

/// The body around the records: usually a batch, sometimes odd shapes.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Batch,
    ObjectOfRecords,
    ScalarCustomers,
}

fn body_gen() -> impl Strategy<Value = (Shape, Vec<Value>, Value)> {
    (
        prop_oneof![8 => Just(Shape::Batch), 1 => Just(Shape::ObjectOfRecords), 1 => Just(Shape::ScalarCustomers)],
        prop::collection::vec(
            prop_oneof![12 => record(), 1 => leaf(), 1 => Just(json!([]))],
            0..=4,
        ),
        tree(),
    )
}

fn assemble(shape: Shape, records: Vec<Value>, extra: Value, records_root: bool) -> Value {
    if records_root {
        return records.into_iter().next().unwrap_or(extra);
    }
    let customers = match shape {
        Shape::Batch => Value::Array(records),
        Shape::ObjectOfRecords => Value::Object(
            records
                .into_iter()
                .enumerate()
                .map(|(i, r)| (format!("r{i}"), r))
                .collect(),
        ),
        Shape::ScalarCustomers => json!("M"),
    };
    json!({ "customers": customers, "page": "M", "meta": extra })
}

/// Replaces the placeholders by unique markers.
fn number_markers(v: &mut Value, next: &mut usize) {
    match v {
        Value::String(s) if s == "M" || s == "M@x.io" => {
            let domain = if s.len() > 1 { "@x.io" } else { "" };
            *s = format!("~v{}~{domain}", *next);
            *next += 1;
        }
        Value::Array(a) => a.iter_mut().for_each(|x| number_markers(x, next)),
        Value::Object(o) => o.values_mut().for_each(|x| number_markers(x, next)),
        _ => {}
    }
}

fn markers_in(v: &Value, out: &mut Vec<String>) {
    match v {
        // The whole value: a mask may keep a declared part of it, never all of it.
        Value::String(s) if s.starts_with("~v") => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| markers_in(x, out)),
        Value::Object(o) => o.values().for_each(|x| markers_in(x, out)),
        _ => {}
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

// ---------------------------------------------------------------------------------------
// Exchanges

#[derive(Debug, Clone)]
enum Who {
    Known(usize),
    Unknown,
    Absent,
}

#[derive(Debug, Clone)]
struct ExGen {
    direction: Direction,
    caller: Who,
    caller_by_header: bool,
    upstream: Who,
    query_marker: bool,
    covered: bool,
    email_header: bool,
    subject_header: Option<&'static str>,
    consent_header: Option<&'static str>,
    /// Answers of the consent store, used in turn for the subjects it is asked about.
    store: Vec<u8>,
}

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![4 => (0usize..4).prop_map(Who::Known), 2 => Just(Who::Unknown), 1 => Just(Who::Absent)]
}

fn ex_gen() -> impl Strategy<Value = ExGen> {
    (
        (
            any::<bool>(),
            who(),
            prop::bool::weighted(0.2),
            who(),
            any::<bool>(),
            prop::bool::weighted(0.9),
        ),
        (
            any::<bool>(),
            prop::option::of(select(SUBJECTS)),
            prop::option::weighted(
                0.4,
                select(
                    &[
                        "c-1=k1,k2; c-2=",
                        "c-3=k3",
                        "c-1=k1; c-1=k2",
                        "garbage",
                        "=k1",
                    ][..],
                ),
            ),
            prop::collection::vec(0u8..8, 0..=4),
        ),
    )
        .prop_map(
            |(
                (req, caller, caller_by_header, upstream, query_marker, covered),
                (email_header, subject_header, consent_header, store),
            )| ExGen {
                direction: if req {
                    Direction::Request
                } else {
                    Direction::Response
                },
                caller,
                caller_by_header,
                upstream,
                query_marker,
                covered,
                email_header,
                subject_header,
                consent_header,
                store,
            },
        )
}

struct Built {
    ex: Exchange,
    headers: Vec<(String, String)>,
    /// Markers in the request's headers and query.
    header_markers: Vec<String>,
    recipient_known: bool,
}

fn build_exchange(p: &Policy, pg: &PolicyGen, g: &ExGen, first_marker: usize) -> Built {
    let services = pg.service_names();
    let known = |w: &Who| match w {
        Who::Known(i) if *i < services.len() => Some(services[*i]),
        _ => None,
    };
    let caller_name = known(&g.caller);
    let principal = match (&g.caller, caller_name) {
        (_, Some(n)) if !g.caller_by_header => Some(format!("spiffe://t/{n}")),
        (Who::Unknown, _) => Some("spiffe://t/stranger".to_string()),
        _ => None,
    };
    let caller_header = if g.caller_by_header {
        caller_name.map(str::to_string)
    } else {
        None
    };
    let cluster = match (&g.upstream, known(&g.upstream)) {
        (_, Some(n)) => Some(n.to_string()),
        (Who::Absent, _) => None,
        _ => Some("nowhere".to_string()),
    };
    let mut header_markers = Vec::new();
    let mut n = first_marker;
    let mut marker = || {
        let m = format!("~v{n}~");
        n += 1;
        header_markers.push(m.clone());
        m
    };
    let mut path = if g.covered {
        "/v1/customers".to_string()
    } else {
        "/v1/other".to_string()
    };
    if g.query_marker {
        path.push_str(&format!("?email={}&page=2", marker()));
    }
    let mut headers = Vec::new();
    if g.email_header {
        headers.push(("x-email".to_string(), marker()));
    }
    if let Some(s) = g.subject_header {
        headers.push(("x-subject".to_string(), s.to_string()));
    }
    if let Some(c) = g.consent_header {
        headers.push(("x-consent".to_string(), c.to_string()));
    }
    if let Some(c) = &caller_header {
        headers.push(("x-caller".to_string(), c.clone()));
    }
    let caller = p.identify_caller(principal.as_deref(), caller_header.as_deref());
    let upstream = p.identify_upstream(cluster.as_deref(), None);
    let recipient_known = match g.direction {
        Direction::Request => upstream.service.is_some(),
        Direction::Response => caller.service.is_some(),
    };
    let ex = p.exchange(
        Some("req-1".into()),
        "POST",
        &path,
        caller,
        upstream,
        &headers,
    );
    Built {
        ex,
        headers,
        header_markers,
        recipient_known,
    }
}

fn store_answers(subjects: &[String], seeds: &[u8]) -> StoreAnswers {
    let mut out = StoreAnswers::new();
    for (i, s) in subjects.iter().enumerate() {
        let seed = seeds.get(i % seeds.len().max(1)).copied().unwrap_or(7);
        match seed {
            0..=4 => {
                let m: BTreeMap<String, bool> = CONSENT_KEYS
                    .iter()
                    .enumerate()
                    .map(|(b, k)| (k.to_string(), seed & (1 << b.min(2)) != 0))
                    .collect();
                out.insert(s.clone(), ConsentAnswer::Known(m));
            }
            5 | 6 => {
                out.insert(s.clone(), ConsentAnswer::Unknown);
            }
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Driving the engine as the glue does

#[derive(Debug, Clone)]
struct BodyRun {
    store_subjects: Vec<String>,
    /// The new body (None: unchanged) and the report, or why it was uninspectable.
    result: Result<(Option<Vec<u8>>, Report), Uninspectable>,
    log: DecisionLog,
    log_json: String,
    log_enforced: bool,
    log_status: Option<u32>,
    log_mode: String,
}

type RunKey = (
    Vec<String>,
    Result<
        (
            Option<Vec<u8>>,
            BTreeMap<&'static str, usize>,
            BTreeSet<String>,
            usize,
        ),
        Uninspectable,
    >,
    String,
);

impl BodyRun {
    /// Everything the run produced, comparable.
    fn key(&self) -> RunKey {
        (
            self.store_subjects.clone(),
            self.result
                .clone()
                .map(|(b, r)| (b, r.counts(), r.blocked.clone(), r.decisions())),
            self.log_json.clone(),
        )
    }
}

fn run_body(
    p: &Policy,
    ex: &Exchange,
    d: Direction,
    ct: Option<&str>,
    ce: Option<&str>,
    body: &[u8],
    seeds: &[u8],
) -> BodyRun {
    let (store_subjects, result) = match p.plan_body(ex, d, ct, ce, body) {
        Ok(plan) => {
            let subjects = plan.store_subjects.clone();
            let store = store_answers(&subjects, seeds);
            let v = p.judge_body(ex, d, plan, &store);
            (subjects, Ok((v.body, v.report)))
        }
        Err(u) => (Vec::new(), Err(u)),
    };
    let empty = Report::default();
    let (report, failure) = match &result {
        Ok((_, r)) => (r, None),
        Err(u) => (&empty, Some(u)),
    };
    let log = p.decision_log(ex, d, report, failure, 0);
    BodyRun {
        store_subjects,
        log_json: log.to_json(),
        log: log.clone(),
        log_enforced: log.enforced,
        log_status: log.status,
        log_mode: log.mode.to_string(),
        result,
    }
}

fn run_headers(
    p: &Policy,
    ex: &Exchange,
    d: Direction,
    headers: &[(String, String)],
    seeds: &[u8],
) -> (HeaderVerdict, String) {
    let plan = p.plan_headers(ex, d, headers);
    let store = store_answers(&plan.store_subjects, seeds);
    let v = p.judge_headers(ex, d, headers, &store);
    let log = p.decision_log(ex, d, &v.report, None, 0).to_json();
    (v, log)
}

// ---------------------------------------------------------------------------------------
// The oracle: what the output must be, given the input and the engine's decisions.

fn index_nodes<'v>(v: &'v Value, path: &mut String, out: &mut HashMap<String, &'v Value>) {
    out.insert(path.clone(), v);
    let len = path.len();
    match v {
        Value::Object(o) => {
            for (k, c) in o {
                push_key(path, k);
                index_nodes(c, path, out);
                path.truncate(len);
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                path.push_str(&format!("[{i}]"));
                index_nodes(c, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// Whether a value holds a scalar other than `null` anywhere.
fn holds_value(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Object(o) => o.values().any(holds_value),
        Value::Array(a) => a.iter().any(holds_value),
        _ => true,
    }
}

/// The records of a body and their normalized paths.
fn records_of(body: &Value, root: bool) -> Vec<(String, &Value)> {
    if root {
        return vec![("$".to_string(), body)];
    }
    let mut out = Vec::new();
    match body.get("customers") {
        Some(Value::Array(a)) => {
            for (i, r) in a.iter().enumerate() {
                out.push((format!("$.customers[{i}]"), r));
            }
        }
        Some(Value::Object(o)) => {
            for (k, r) in o {
                let mut p = "$.customers".to_string();
                push_key(&mut p, k);
                out.push((p, r));
            }
        }
        _ => {}
    }
    out
}

fn severity(a: &str) -> u8 {
    match a {
        "mask" => 1,
        "hash" => 2,
        "redact" => 3,
        "strip" => 4,
        "block" => 5,
        _ => 0,
    }
}

/// (path, action) of each field decision a record lists: one per path of each group
/// (with exact paths, one per decided node and category).
fn decided(log: &DecisionLog) -> Vec<(&str, &'static str)> {
    log.decisions
        .iter()
        .flat_map(|g| g.paths.iter().map(move |p| (p.as_str(), g.action)))
        .collect()
}

/// The record of a report (headers' or body's) under `p`.
fn record_of(p: &Policy, ex: &Exchange, d: Direction, r: &Report) -> DecisionLog {
    p.decision_log(ex, d, r, None, 0)
}

/// Per path, the action applied: the most severe of its non-allow decisions.
fn applied_actions(log: &DecisionLog) -> HashMap<String, &'static str> {
    let mut m: HashMap<String, &'static str> = HashMap::new();
    for (path, action) in decided(log) {
        if action == "allow" || path.starts_with("header:") || path.starts_with("query:") {
            continue;
        }
        let e = m.entry(path.to_string()).or_insert(action);
        if severity(action) > severity(e) {
            *e = action;
        }
    }
    m
}

/// Writes every index of a concrete path as `[*]`, as the records the filter writes do.
fn template(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(i) = rest.find('[') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && after[digits..].starts_with(']') {
            out.push_str("[*]");
            rest = &after[digits + 1..];
        } else if after.starts_with('\'') {
            // A quoted key: copy it whole (its text may hold `[` and escaped quotes).
            let mut end = 1;
            let b = after.as_bytes();
            while end < b.len() && b[end] != b'\'' {
                end += if b[end] == b'\\' { 2 } else { 1 };
            }
            let end = (end + 2).min(after.len());
            out.push('[');
            out.push_str(&after[..end]);
            rest = &after[end..];
        } else {
            out.push('[');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// (f) the record the filter writes is the exact record with every index written `[*]`:
/// the same groups in the same order, each with the same count and subjects, and its
/// templates those of its exact paths, each once, in first-seen order.
fn check_templated(exact: &DecisionLog, templated: &DecisionLog) -> Result<(), TestCaseError> {
    if exact.decisions.iter().any(|g| g.folded > 0) {
        return Ok(());
    }
    prop_assert_eq!(exact.decisions.len(), templated.decisions.len());
    prop_assert_eq!(&exact.subjects, &templated.subjects);
    prop_assert_eq!(&exact.counts, &templated.counts);
    prop_assert_eq!(exact.records, templated.records);
    for (e, t) in exact.decisions.iter().zip(&templated.decisions) {
        let mut want: Vec<String> = Vec::new();
        for p in &e.paths {
            let tp = template(p);
            if !want.contains(&tp) {
                want.push(tp);
            }
        }
        prop_assert_eq!(&t.paths, &want);
        prop_assert!(t
            .paths
            .iter()
            .all(|p| !p.contains(|c: char| c.is_ascii_digit()) || p == &template(p)));
        let (mut e2, mut t2) = (e.clone(), t.clone());
        e2.paths.clear();
        t2.paths.clear();
        prop_assert_eq!(e2, t2);
    }
    Ok(())
}

#[derive(Debug)]
enum Exp {
    Same(Value),
    Hashed,
    Masked(String),
    /// A masked array or object: its shape is the engine's choice, but no value inside
    /// it may reach the recipient (checked with the markers).
    MaskedContainer,
    Obj(Vec<(String, Exp)>),
    Arr(Vec<Exp>),
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The expected output: the input, changed only where a decision says so.
fn expect(
    v: &Value,
    path: &mut String,
    acts: &HashMap<String, &'static str>,
    records: &HashSet<String>,
    marker: &str,
) -> Option<Exp> {
    if let Some(a) = acts.get(path.as_str()) {
        return match *a {
            // A record removed as a whole stays in place as null.
            "strip" if records.contains(path.as_str()) => Some(Exp::Same(Value::Null)),
            "strip" => None,
            // null holds no personal data: every action but strip leaves it null.
            "redact" | "hash" | "mask" if v.is_null() => Some(Exp::Same(Value::Null)),
            "redact" => Some(Exp::Same(json!(marker))),
            "hash" => Some(Exp::Hashed),
            "mask" if v.is_object() || v.is_array() => Some(Exp::MaskedContainer),
            "mask" => Some(Exp::Masked(value_text(v))),
            other => panic!("unexpected action {other} in an unblocked message"),
        };
    }
    let len = path.len();
    Some(match v {
        Value::Object(o) => Exp::Obj(
            o.iter()
                .filter_map(|(k, c)| {
                    push_key(path, k);
                    let e = expect(c, path, acts, records, marker);
                    path.truncate(len);
                    e.map(|e| (k.clone(), e))
                })
                .collect(),
        ),
        Value::Array(a) => Exp::Arr(
            a.iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    path.push_str(&format!("[{i}]"));
                    let e = expect(c, path, acts, records, marker);
                    path.truncate(len);
                    e
                })
                .collect(),
        ),
        other => Exp::Same(other.clone()),
    })
}

fn is_h1(s: &str) -> bool {
    s.len() == 35
        && s.starts_with("h1:")
        && s[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_masked(orig: &str, out: &str) -> Result<(), String> {
    let o: Vec<char> = orig.chars().collect();
    let m: Vec<char> = out.chars().collect();
    if o.len() != m.len() {
        return Err(format!("mask of {orig:?} changed the length: {out:?}"));
    }
    if o.iter().zip(&m).any(|(a, b)| *b != '*' && a != b) {
        return Err(format!(
            "mask of {orig:?} kept a character it did not have: {out:?}"
        ));
    }
    // keep_domain keeps the part from the last `@`; of the rest at least half is masked.
    let local = o.iter().rposition(|c| *c == '@').unwrap_or(o.len());
    let stars = m.iter().filter(|c| **c == '*').count();
    if stars * 2 < local {
        return Err(format!("mask of {orig:?} kept more than half: {out:?}"));
    }
    Ok(())
}

fn compare(e: &Exp, out: &Value, at: &str) -> Result<(), String> {
    match (e, out) {
        (Exp::Same(v), o) if v == o => Ok(()),
        (Exp::Hashed, Value::String(s)) if is_h1(s) => Ok(()),
        (Exp::MaskedContainer, _) => Ok(()),
        (Exp::Masked(orig), Value::String(s)) => {
            check_masked(orig, s).map_err(|m| format!("{at}: {m}"))
        }
        (Exp::Obj(kv), Value::Object(o)) => {
            let want: HashSet<&str> = kv.iter().map(|(k, _)| k.as_str()).collect();
            let got: HashSet<&str> = o.keys().map(String::as_str).collect();
            if want != got {
                return Err(format!("{at}: keys {got:?}, expected {want:?}"));
            }
            for (k, ce) in kv {
                let mut p = at.to_string();
                push_key(&mut p, k);
                compare(ce, &o[k.as_str()], &p)?;
            }
            Ok(())
        }
        (Exp::Arr(items), Value::Array(a)) => {
            if items.len() != a.len() {
                return Err(format!(
                    "{at}: {} elements, expected {}",
                    a.len(),
                    items.len()
                ));
            }
            for (i, (ce, o)) in items.iter().zip(a).enumerate() {
                compare(ce, o, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        (e, o) => Err(format!("{at}: got {o}, expected {e:?}")),
    }
}

/// Property (c)'s oracle: the nodes of each record that some field selector declares,
/// found here without the engine. Below a declared node nothing more is looked at: the
/// node is judged as a whole.
fn declared_nodes<'v>(fields: &[FieldGen], rec: &'v Value, out: &mut Vec<&'v Value>) {
    fn go<'v>(
        fields: &[FieldGen],
        v: &'v Value,
        states: &[(usize, usize)],
        out: &mut Vec<&'v Value>,
    ) {
        if states.iter().any(|&(f, pos)| pos == fields[f].sel.len()) {
            out.push(v);
            return;
        }
        let step = |e: Edge<'_>| {
            let mut next = Vec::new();
            for &(f, pos) in states {
                let mut q = Vec::new();
                advance(&fields[f].sel, pos, e, &mut q);
                next.extend(q.into_iter().map(|q| (f, q)));
            }
            next
        };
        match v {
            Value::Object(o) => {
                for (k, c) in o {
                    let n = step(Edge::Key(k));
                    if !n.is_empty() {
                        go(fields, c, &n, out);
                    }
                }
            }
            Value::Array(a) => {
                for (i, c) in a.iter().enumerate() {
                    let n = step(Edge::Index(i, a.len()));
                    if !n.is_empty() {
                        go(fields, c, &n, out);
                    }
                }
            }
            _ => {}
        }
    }
    let initial: Vec<(usize, usize)> = (0..fields.len()).map(|f| (f, 0)).collect();
    go(fields, rec, &initial, out);
}

// ---------------------------------------------------------------------------------------
// The checks

struct Case {
    pg: PolicyGen,
    body: Value,
    g: ExGen,
}

fn make_case(pg: PolicyGen, shape: Shape, recs: Vec<Value>, extra: Value, g: ExGen) -> Case {
    let mut body = assemble(shape, recs, extra, pg.opts.records_root);
    let mut n = 0;
    number_markers(&mut body, &mut n);
    Case { pg, body, g }
}

fn first_free_marker(body: &Value) -> usize {
    let mut ms = Vec::new();
    markers_in(body, &mut ms);
    ms.len()
}

/// (a), (b) enforce side, (c): the forwarded bytes against the oracle.
fn check_enforce(c: &Case) -> Result<(), TestCaseError> {
    let p = c.pg.compile("enforce");
    let b = build_exchange(&p, &c.pg, &c.g, first_free_marker(&c.body));
    let d = c.g.direction;
    let input = serde_json::to_vec(&c.body).unwrap();
    let run = run_body(
        &p,
        &b.ex,
        d,
        Some("application/json"),
        None,
        &input,
        &c.g.store,
    );

    // The decision log never holds a customer value.
    let mut all = Vec::new();
    markers_in(&c.body, &mut all);
    all.extend(b.header_markers.iter().cloned());
    for m in &all {
        prop_assert!(
            !run.log_json.contains(m.as_str()),
            "log holds {m}: {}",
            run.log_json
        );
    }

    match &run.result {
        Err(u) => {
            prop_assert!(!u.code().is_empty());
            let fail_open = c.pg.opts.fail_open;
            prop_assert_eq!(run.log_enforced, !fail_open);
            prop_assert_eq!(run.log_status.is_some(), !fail_open);
            for m in &all {
                prop_assert!(
                    !u.detail.contains(m.as_str()),
                    "detail holds {}: {}",
                    m,
                    u.detail
                );
            }
        }
        Ok((new_body, report)) => {
            if report.is_blocked() {
                // The filter refuses the message: nothing of it is forwarded, and the 403
                // names categories only.
                prop_assert_eq!(run.log_status, Some(403));
                let reply = p.block_response(&b.ex, d, report);
                for m in &all {
                    prop_assert!(!contains(&reply, m), "block reply holds {}", m);
                }
            } else {
                let out_bytes = new_body.clone().unwrap_or_else(|| input.clone());
                let out: Value = serde_json::from_slice(&out_bytes)
                    .map_err(|e| TestCaseError::fail(format!("output is not JSON: {e}")))?;
                if run.log.decisions.iter().all(|g| g.folded == 0) {
                    check_exact(c, &b, &run.log, &out, &out_bytes)?;
                }
                // A route no binding covers is not inspected at all.
                if !b.recipient_known && c.g.covered {
                    check_unknown_recipient(c, &run.log, &out_bytes)?;
                }
                if new_body.is_none() {
                    // Unless the action leaves the value as it was: a `null` (which
                    // every action but strip keeps), or a mask of a container that
                    // holds no value.
                    let mut nodes = HashMap::new();
                    index_nodes(&c.body, &mut "$".to_string(), &mut nodes);
                    let unchanged_by = |path: &str, action: &str| match nodes.get(path) {
                        Some(Value::Null) => action != "strip",
                        Some(v @ (Value::Object(_) | Value::Array(_))) => {
                            action == "mask" && !holds_value(v)
                        }
                        _ => false,
                    };
                    prop_assert!(
                        decided(&run.log)
                            .iter()
                            .all(|(path, action)| *action == "allow"
                                || path.starts_with("header:")
                                || path.starts_with("query:")
                                || unchanged_by(path, action)),
                        "a field was denied but the body was not rewritten"
                    );
                }
            }
        }
    }

    // The record the filter writes: the same, with path templates.
    let templated = c.pg.compile_templated("enforce");
    let tb = build_exchange(&templated, &c.pg, &c.g, first_free_marker(&c.body));
    let trun = run_body(
        &templated,
        &tb.ex,
        d,
        Some("application/json"),
        None,
        &input,
        &c.g.store,
    );
    check_templated(&run.log, &trun.log)?;
    for m in &all {
        prop_assert!(!trun.log_json.contains(m.as_str()), "log holds {m}");
    }

    // Headers and query.
    let (hv, hlog) = run_headers(&p, &b.ex, d, &b.headers, &c.g.store);
    for m in &all {
        prop_assert!(!hlog.contains(m.as_str()), "header log holds {m}: {hlog}");
    }
    if !hv.report.is_blocked() {
        let hrec = record_of(&p, &b.ex, d, &hv.report);
        for (path, action) in decided(&hrec) {
            if action == "allow" {
                continue;
            }
            if let Some(name) = path.strip_prefix("header:") {
                let vals = hv
                    .set_headers
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone());
                prop_assert!(vals.is_some(), "denied header {name} not rewritten");
                let vals = vals.unwrap();
                let orig: Vec<&String> = b
                    .headers
                    .iter()
                    .filter(|(k, _)| k == name)
                    .map(|(_, v)| v)
                    .collect();
                match action {
                    "strip" => prop_assert!(vals.is_empty()),
                    "redact" => prop_assert!(vals.iter().all(|v| v == c.pg.redact_marker())),
                    "hash" => prop_assert!(vals.iter().all(|v| is_h1(v))),
                    "mask" => {
                        for (o, v) in orig.iter().zip(&vals) {
                            check_masked(o, v).map_err(TestCaseError::fail)?;
                        }
                    }
                    other => prop_assert!(false, "header action {other}"),
                }
            }
            if path.starts_with("query:") {
                let new_path = hv.new_path.clone();
                prop_assert!(new_path.is_some(), "denied query parameter not rewritten");
                for m in &b.header_markers {
                    prop_assert!(
                        !new_path.as_ref().unwrap().contains(m.as_str()),
                        "query keeps {m}"
                    );
                }
            }
        }
    }
    Ok(())
}

fn check_exact(
    c: &Case,
    b: &Built,
    log: &DecisionLog,
    out: &Value,
    out_bytes: &[u8],
) -> Result<(), TestCaseError> {
    let acts = applied_actions(log);
    let mut nodes = HashMap::new();
    index_nodes(&c.body, &mut "$".to_string(), &mut nodes);
    // (a) every decided path is a node of the input, and no marker below a denied node
    // reaches the output.
    for (path, action) in &acts {
        let node = nodes.get(path.as_str());
        prop_assert!(
            node.is_some(),
            "decision for {path} ({action}), which is not in the input"
        );
        let mut ms = Vec::new();
        markers_in(node.unwrap(), &mut ms);
        for m in ms {
            prop_assert!(
                !contains(out_bytes, &m),
                "{m} below {path} was decided {action} but reaches the recipient\n{}",
                String::from_utf8_lossy(out_bytes)
            );
        }
    }
    // (a)+(b): the output is the input changed exactly where decisions say, each change
    // of its action's shape.
    let records: HashSet<String> = records_of(&c.body, c.pg.opts.records_root)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let exp = expect(
        &c.body,
        &mut "$".to_string(),
        &acts,
        &records,
        c.pg.redact_marker(),
    );
    match exp {
        Some(e) => compare(&e, out, "$").map_err(|m| {
            TestCaseError::fail(format!(
                "{m}\n  input:  {}\n  output: {out}\n  recipient known: {}",
                c.body, b.recipient_known
            ))
        })?,
        None => prop_assert!(false, "the whole body was stripped"),
    }
    Ok(())
}

fn check_unknown_recipient(
    c: &Case,
    log: &DecisionLog,
    out_bytes: &[u8],
) -> Result<(), TestCaseError> {
    for (path, action) in decided(log) {
        prop_assert!(action != "allow", "unknown recipient allowed {}", path);
    }
    for (path, rec) in records_of(&c.body, c.pg.opts.records_root) {
        let mut declared = Vec::new();
        declared_nodes(&c.pg.fields, rec, &mut declared);
        for node in declared {
            let mut ms = Vec::new();
            markers_in(node, &mut ms);
            for m in ms {
                prop_assert!(
                    !contains(out_bytes, &m),
                    "unknown recipient receives declared {m} of record {path}\n{}",
                    String::from_utf8_lossy(out_bytes)
                );
            }
        }
    }
    Ok(())
}

/// (b) audit decides exactly as enforce and is never enforced.
fn check_audit(c: &Case) -> Result<(), TestCaseError> {
    let enforce = c.pg.compile("enforce");
    let audit = c.pg.compile("audit");
    let input = serde_json::to_vec(&c.body).unwrap();
    let first = first_free_marker(&c.body);
    let be = build_exchange(&enforce, &c.pg, &c.g, first);
    let ba = build_exchange(&audit, &c.pg, &c.g, first);
    let d = c.g.direction;
    let re = run_body(
        &enforce,
        &be.ex,
        d,
        Some("application/json"),
        None,
        &input,
        &c.g.store,
    );
    let ra = run_body(
        &audit,
        &ba.ex,
        d,
        Some("application/json"),
        None,
        &input,
        &c.g.store,
    );
    prop_assert_eq!(ra.log_mode.as_str(), "audit");
    prop_assert!(!ra.log_enforced, "audit log says enforced");
    prop_assert_eq!(ra.log_status, None);
    match (&re.result, &ra.result) {
        (Ok((_, r1)), Ok((_, r2))) => {
            prop_assert_eq!(&re.log.decisions, &ra.log.decisions);
            prop_assert_eq!(&re.log.subjects, &ra.log.subjects);
            prop_assert_eq!(&r1.counts(), &r2.counts());
            prop_assert_eq!(&r1.blocked, &r2.blocked);
        }
        (Err(u1), Err(u2)) => prop_assert_eq!(u1.kind, u2.kind),
        (a, b) => prop_assert!(false, "enforce {a:?} but audit {b:?}"),
    }
    // The entry is the enforce entry but for mode, enforced and status.
    let strip = |s: &str| -> Value {
        let mut v: Value = serde_json::from_str(s).unwrap();
        let o = v.as_object_mut().unwrap();
        for k in ["mode", "enforced", "status"] {
            o.remove(k);
        }
        v
    };
    prop_assert_eq!(strip(&re.log_json), strip(&ra.log_json));
    let (he, _) = run_headers(&enforce, &be.ex, d, &be.headers, &c.g.store);
    let (ha, hl) = run_headers(&audit, &ba.ex, d, &ba.headers, &c.g.store);
    prop_assert_eq!(
        record_of(&enforce, &be.ex, d, &he.report).decisions,
        record_of(&audit, &ba.ex, d, &ha.report).decisions
    );
    prop_assert!(hl.contains("\"enforced\":false"));
    Ok(())
}

/// (e) the same input twice, and through a second compilation of the same policy.
fn check_deterministic(c: &Case) -> Result<(), TestCaseError> {
    let p1 = c.pg.compile("enforce");
    let p2 = c.pg.compile("enforce");
    let input = serde_json::to_vec(&c.body).unwrap();
    let first = first_free_marker(&c.body);
    let d = c.g.direction;
    let b1 = build_exchange(&p1, &c.pg, &c.g, first);
    let b2 = build_exchange(&p2, &c.pg, &c.g, first);
    let r1 = run_body(
        &p1,
        &b1.ex,
        d,
        Some("application/json"),
        None,
        &input,
        &c.g.store,
    );
    let r1b = run_body(
        &p1,
        &b1.ex,
        d,
        Some("application/json"),
        None,
        &input,
        &c.g.store,
    );
    let r2 = run_body(
        &p2,
        &b2.ex,
        d,
        Some("application/json"),
        None,
        &input,
        &c.g.store,
    );
    prop_assert_eq!(r1.key(), r1b.key());
    prop_assert_eq!(r1.key(), r2.key());
    let (h1, l1) = run_headers(&p1, &b1.ex, d, &b1.headers, &c.g.store);
    let (h2, l2) = run_headers(&p2, &b2.ex, d, &b2.headers, &c.g.store);
    prop_assert_eq!(l1, l2);
    prop_assert_eq!(h1.set_headers, h2.set_headers);
    prop_assert_eq!(h1.new_path, h2.new_path);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// (f) the streaming path against the tree

/// Writes `v` as JSON in another spelling chosen by `seed`: whitespace between tokens,
/// `\u` escapes of letters in keys and strings, `\/`, integers with an exponent, and
/// sometimes an object's members rotated (so a record's consent may come first).
fn respell(v: &Value, seed: u64) -> Vec<u8> {
    struct Spell {
        state: u64,
        out: String,
    }
    impl Spell {
        fn roll(&mut self, n: u64) -> u64 {
            self.state = self
                .state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.state >> 33) % n
        }
        fn ws(&mut self) {
            const WS: [&str; 6] = ["", "", "", " ", "\n  ", "\t\r\n"];
            let w = WS[self.roll(6) as usize];
            self.out.push_str(w);
        }
        fn string(&mut self, s: &str) {
            self.out.push('"');
            for c in s.chars() {
                match c {
                    '"' => self.out.push_str("\\\""),
                    '\\' => self.out.push_str("\\\\"),
                    '/' if self.roll(2) == 0 => self.out.push_str("\\/"),
                    c if (c as u32) < 0x20 => self.out.push_str(&format!("\\u{:04x}", c as u32)),
                    c if c.is_alphanumeric() && self.roll(4) == 0 => {
                        let mut units = [0u16; 2];
                        for u in c.encode_utf16(&mut units) {
                            self.out.push_str(&format!("\\u{u:04X}"));
                        }
                    }
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }
        fn value(&mut self, v: &Value) {
            self.ws();
            match v {
                Value::Object(o) => {
                    let mut members: Vec<(&String, &Value)> = o.iter().collect();
                    if !members.is_empty() && self.roll(3) == 0 {
                        let k = self.roll(members.len() as u64) as usize;
                        members.rotate_left(k);
                    }
                    self.out.push('{');
                    for (i, (k, c)) in members.into_iter().enumerate() {
                        if i > 0 {
                            self.out.push(',');
                        }
                        self.ws();
                        self.string(k);
                        self.ws();
                        self.out.push(':');
                        self.value(c);
                    }
                    self.ws();
                    self.out.push('}');
                }
                Value::Array(a) => {
                    self.out.push('[');
                    for (i, c) in a.iter().enumerate() {
                        if i > 0 {
                            self.out.push(',');
                        }
                        self.value(c);
                    }
                    self.ws();
                    self.out.push(']');
                }
                Value::String(s) => self.string(s),
                Value::Number(n) if n.is_i64() && self.roll(4) == 0 => {
                    self.out.push_str(&format!("{n}e0"));
                }
                other => self.out.push_str(&other.to_string()),
            }
            self.ws();
        }
    }
    let mut sp = Spell {
        state: seed,
        out: String::new(),
    };
    sp.value(v);
    sp.out.into_bytes()
}

/// Runs one body through both paths and checks that they agree.
fn agree(
    p: &Policy,
    ex: &Exchange,
    d: Direction,
    ce: Option<&str>,
    input: &[u8],
    seeds: &[u8],
) -> Result<(), TestCaseError> {
    let ct = Some("application/json");
    let stream = p.plan_body(ex, d, ct, ce, input);
    let tree = p.plan_body_tree(ex, d, ct, ce, input);
    let shown = String::from_utf8_lossy(input);
    match (stream, tree) {
        (Err(s), Err(t)) => {
            prop_assert_eq!(s.kind, t.kind, "refusals differ on {}", shown);
            prop_assert_eq!(s.tolerated, t.tolerated);
            // Syntax errors are worded by each parser; every other refusal the same.
            if s.kind != UninspectableKind::Malformed {
                prop_assert_eq!(&s.detail, &t.detail);
            }
        }
        (Ok(sp), Ok(tp)) => {
            prop_assert_eq!(&sp.store_subjects, &tp.store_subjects, "on {}", shown);
            let store = store_answers(&sp.store_subjects, seeds);
            let sv = p.judge_body(ex, d, sp, &store);
            let tv = p.judge_body_tree(ex, d, tp, &store);
            // The same decision record: groups, paths, counts, subjects, records.
            let (sl, tl) = (
                record_of(p, ex, d, &sv.report).to_json(),
                record_of(p, ex, d, &tv.report).to_json(),
            );
            prop_assert_eq!(sl, tl, "on {}", shown);
            prop_assert_eq!(sv.report.by_category(), tv.report.by_category());
            prop_assert_eq!(&sv.report.blocked, &tv.report.blocked);
            if sv.report.is_blocked() {
                // Not forwarded: the streaming path stops writing at the first block.
                return Ok(());
            }
            if tv.body.is_none() && sv.body.is_none() {
                // Both forward the input as it came (an empty body included).
                return Ok(());
            }
            if tv.body.is_none() {
                prop_assert!(
                    sv.body.is_none(),
                    "the tree changed nothing, the stream did: {}",
                    shown
                );
            }
            let decode = |b: &[u8]| -> Result<Value, TestCaseError> {
                let plain = match ce {
                    Some(_) => gunzip(b),
                    None => b.to_vec(),
                };
                serde_json::from_slice(&plain)
                    .map_err(|e| TestCaseError::fail(format!("output is not JSON: {e}")))
            };
            let out_s = decode(sv.body.as_deref().unwrap_or(input))?;
            let out_t = decode(tv.body.as_deref().unwrap_or(input))?;
            prop_assert!(
                same_json(&out_s, &out_t),
                "outputs differ on {}:\n stream {}\n tree   {}",
                shown,
                out_s,
                out_t
            );
        }
        (s, t) => {
            return Err(TestCaseError::fail(format!(
                "stream {:?} but tree {:?} on {shown}",
                s.map(|_| "ok").map_err(|e| e.code()),
                t.map(|_| "ok").map_err(|e| e.code()),
            )));
        }
    }
    Ok(())
}

fn gzip(b: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// JSON equality, numbers compared as the values they denote: the streaming path keeps a
/// number's digits as sent, the tree path writes the f64 serde_json read, and serde_json
/// reads a long integer and the shortest form of its f64 a few ulps apart.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, a)| y.get(k).is_some_and(|b| same_json(a, b)))
        }
        _ => a == b,
    }
}

/// `v` with every number as an f64 (`1` and `1e0` are one number, two serde values).
fn numbers_as_f64(v: &Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64()),
        Value::Array(a) => Value::Array(a.iter().map(numbers_as_f64).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, c)| (k.clone(), numbers_as_f64(c)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Records paths the other properties do not use (they need to know where records are):
/// descendants, negative indexes, unions, wildcards on objects.
const RECORDS_PATHS: &[&str] = &[
    "$..customers[*]",
    "$.customers[-1]",
    "$.customers[-2,0]",
    "$..*",
    "$.customers.*",
    "$['customers','meta'][*]",
    "$..customers",
    "$..r1",
];

fn check_oracle(
    c: &Case,
    seed: u64,
    gzipped: bool,
    records: Option<&str>,
) -> Result<(), TestCaseError> {
    let mut pj = c.pg.to_json("enforce");
    if let Some(r) = records {
        pj["messages"][0]["records"] = json!(r);
    }
    // With exact paths, so that every decision names its node; the template record is
    // the same walk with `[*]` (property "the record is the exact one templated").
    let p = Policy::compile(pj.to_string().as_bytes(), &env)
        .map_err(|e| TestCaseError::fail(format!("{e}")))?
        .with_exact_paths();
    let b = build_exchange(&p, &c.pg, &c.g, first_free_marker(&c.body));
    let input = respell(&c.body, seed);
    let reread: Option<Value> = serde_json::from_slice(&input).ok();
    prop_assert_eq!(
        reread.map(|v| numbers_as_f64(&v)),
        Some(numbers_as_f64(&c.body)),
        "respelling changed the body"
    );
    if gzipped {
        agree(
            &p,
            &b.ex,
            c.g.direction,
            Some("gzip"),
            &gzip(&input),
            &c.g.store,
        )
    } else {
        agree(&p, &b.ex, c.g.direction, None, &input, &c.g.store)
    }
}

// ---------------------------------------------------------------------------------------
// (d) hostile bodies

/// Bodies at the edges of JSON: huge numbers, invalid UTF-8, lone surrogates, escaped
/// duplicate keys, a BOM, trailing bytes.
const ODD_BODIES: &[&[u8]] = &[
    br#"{"customers":[{"id":1e999999,"email":"~v0~"}]}"#,
    br#"{"customers":[{"id":123456789012345678901234567890123456789,"email":"~v0~"}]}"#,
    br#"{"customers":[{"id":-0,"age":1.7976931348623157e308,"email":-1e-400}]}"#,
    b"{\"customers\":[{\"email\":\"\xff\xfe\"}]}",
    b"{\"customers\":[{\"email\":\"\\ud800\"}]}",
    b"{\"customers\":[{\"em\\u0061il\":\"~v0~\",\"email\":\"~v1~\"}]}",
    b"{\"customers\":[{\"\xc3\x28\":1}]}",
    b"\xef\xbb\xbf{\"customers\":[]}",
    b"{\"customers\":[]} trailing",
    b"{\"customers\":[{\"email\":\"a\"}]}\x00",
    b"   ",
    b"null",
    b"\"customers\"",
    b"[{\"customers\":[{\"email\":\"~v0~\"}]}]",
];

fn hostile_body() -> impl Strategy<Value = Vec<u8>> {
    let valid = body_gen()
        .prop_map(|(s, r, e)| {
            let mut v = assemble(s, r, e, false);
            number_markers(&mut v, &mut 0);
            serde_json::to_vec(&v).unwrap()
        })
        .boxed();
    let mutated = (
        valid.clone(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..=6),
    )
        .prop_map(|(mut b, edits)| {
            for (at, byte, kind) in edits {
                if b.is_empty() {
                    b.push(byte);
                    continue;
                }
                let i = at.index(b.len());
                match kind {
                    0 => b[i] = byte,
                    1 => b.insert(i, byte),
                    _ => {
                        b.remove(i);
                    }
                }
            }
            b
        });
    let deep = (1usize..=200, any::<bool>(), any::<bool>()).prop_map(|(n, obj, closed)| {
        let (open, close) = if obj {
            ("{\"customers\":", "}")
        } else {
            ("[", "]")
        };
        let mut s = open.repeat(n);
        s.push_str("{\"email\":\"~v0~\"}");
        if closed {
            s.push_str(&close.repeat(n));
        }
        s.into_bytes()
    });
    let odd = select(ODD_BODIES).prop_map(|b| b.to_vec());
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..256),
        4 => mutated,
        2 => deep,
        2 => odd,
        1 => valid,
    ]
}

fn check_no_panic(
    pg: &PolicyGen,
    g: &ExGen,
    body: &[u8],
    ct: Option<&str>,
    ce: Option<&str>,
) -> Result<(), TestCaseError> {
    for mode in ["enforce", "audit"] {
        let p = pg.compile(mode);
        let b = build_exchange(&p, pg, g, 1000);
        let d = g.direction;
        let run = run_body(&p, &b.ex, d, ct, ce, body, &g.store);
        match &run.result {
            Ok((Some(out), _)) => {
                prop_assert!(
                    serde_json::from_slice::<Value>(out).is_ok(),
                    "output is not JSON"
                );
            }
            Ok((None, _)) => {}
            Err(u) => {
                prop_assert!(!u.code().is_empty());
                let s = u.status(d);
                prop_assert!([400, 413, 415, 502, 503].contains(&s), "status {s}");
                let reply = p.uninspectable_response(&b.ex, d, u);
                prop_assert!(serde_json::from_slice::<Value>(&reply).is_ok());
            }
        }
        prop_assert!(serde_json::from_str::<Value>(&run.log_json).is_ok());
        let _ = run_headers(&p, &b.ex, d, &b.headers, &g.store);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(160))]

    #[test]
    fn enforce_forwards_no_denied_value_and_changes_only_what_it_decided(
        pg in policy_gen(),
        (shape, recs, extra) in body_gen(),
        g in ex_gen(),
    ) {
        check_enforce(&make_case(pg, shape, recs, extra, g))?;
    }

    #[test]
    fn an_unknown_recipient_gets_no_declared_field(
        pg in policy_gen(),
        (shape, recs, extra) in body_gen(),
        mut g in ex_gen(),
    ) {
        // Every case goes to an unknown recipient; check_enforce applies property (c).
        g.upstream = Who::Unknown;
        g.caller = Who::Unknown;
        g.covered = true;
        check_enforce(&make_case(pg, shape, recs, extra, g))?;
    }

    #[test]
    fn audit_decides_as_enforce_and_is_never_enforced(
        pg in policy_gen(),
        (shape, recs, extra) in body_gen(),
        g in ex_gen(),
    ) {
        check_audit(&make_case(pg, shape, recs, extra, g))?;
    }

    #[test]
    fn the_same_input_gives_the_same_output(
        pg in policy_gen(),
        (shape, recs, extra) in body_gen(),
        g in ex_gen(),
    ) {
        check_deterministic(&make_case(pg, shape, recs, extra, g))?;
    }

    #[test]
    fn no_body_makes_the_engine_panic(
        pg in policy_gen(),
        mut g in ex_gen(),
        body in hostile_body(),
        ct in prop::option::weighted(0.9, select(&[
            "application/json", "application/json", "Application/JSON; charset=utf-8",
            "application/problem+json", "text/plain", "application/jsonx", "",
        ][..])),
        ce in prop::option::weighted(0.2, select(&["identity", "gzip", "br", " ", "gzip, br"][..])),
    ) {
        g.covered = true;
        check_no_panic(&pg, &g, &body, ct, ce)?;
    }

    #[test]
    fn the_streaming_path_agrees_with_the_tree(
        pg in policy_gen(),
        (shape, recs, extra) in body_gen(),
        g in ex_gen(),
        seed in any::<u64>(),
        gzipped in prop::bool::weighted(0.1),
        records in prop::option::weighted(0.3, select(RECORDS_PATHS)),
    ) {
        check_oracle(&make_case(pg, shape, recs, extra, g), seed, gzipped, records)?;
    }

    #[test]
    fn the_streaming_path_refuses_what_the_tree_refuses(
        pg in policy_gen(),
        mut g in ex_gen(),
        body in hostile_body(),
    ) {
        g.covered = true;
        let p = pg.compile("enforce");
        let b = build_exchange(&p, &pg, &g, 1000);
        agree(&p, &b.ex, g.direction, None, &body, &g.store)?;
    }

    #[test]
    fn nesting_is_inspected_up_to_max_depth_and_refused_beyond(
        max_depth in 1usize..=127,
        n in 1usize..=160,
        obj in any::<bool>(),
    ) {
        let policy = json!({
            "consentry": 1, "name": "depth", "undeclared": "strip",
            "limits": { "max_depth": max_depth },
            "services": { "s": { "clusters": ["s"] } },
            "purposes": {},
            "messages": [{ "name": "m", "records": "$" }],
        });
        let p = Policy::compile(policy.to_string().as_bytes(), &env).unwrap();
        let ex = p.exchange(None, "POST", "/", p.identify_caller(None, None),
                            p.identify_upstream(Some("s"), None), &[]);
        let (open, close) = if obj { ("{\"a\":", "}") } else { ("[", "]") };
        // n nested containers, the innermost empty.
        let inner = if obj { "{}" } else { "[]" };
        let body = format!("{}{inner}{}", open.repeat(n - 1), close.repeat(n - 1));
        let r = p.plan_body(&ex, Direction::Request, Some("application/json"), None, body.as_bytes());
        if n <= max_depth {
            prop_assert!(r.is_ok(), "depth {n} <= {max_depth} refused: {:?}", r.err());
        } else {
            prop_assert_eq!(r.err().map(|e| e.kind), Some(UninspectableKind::TooDeep));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Minimal cases found by the properties above, kept as regular tests.

/// Runs one request body to the service `svc-a` (which has no purpose) through a policy
/// with the given field bindings, and returns the forwarded body.
fn forwarded(fields: Value, body: Value) -> String {
    let policy = json!({
        "consentry": 1, "name": "unit",
        "services": { "svc-a": { "clusters": ["svc-a"] } },
        "purposes": {},
        "messages": [{ "name": "batch", "records": "$.customers[*]", "fields": fields }],
    });
    let p = Policy::compile(policy.to_string().as_bytes(), &env).unwrap();
    let ex = p.exchange(
        None,
        "POST",
        "/v1/customers",
        p.identify_caller(None, None),
        p.identify_upstream(Some("svc-a"), None),
        &[],
    );
    let input = body.to_string();
    let plan = p
        .plan_body(
            &ex,
            Direction::Request,
            Some("application/json"),
            None,
            input.as_bytes(),
        )
        .unwrap();
    let v = p.judge_body(&ex, Direction::Request, plan, &StoreAnswers::new());
    assert!(!v.report.is_blocked());
    String::from_utf8(v.body.unwrap_or_else(|| input.into_bytes())).unwrap()
}

/// Found by `enforce_forwards_no_denied_value_and_changes_only_what_it_decided`: `mask`
/// with `keep_domain` on a field whose value is an array (or object) masks the value's
/// JSON text and keeps everything from its last `@` on, so other values inside the
/// field reach the recipient unmasked.
#[test]
fn a_mask_keeping_the_domain_does_not_reveal_other_values_of_a_structured_field() {
    let out = forwarded(
        json!([{ "path": "$.email", "category": "user.contact.email",
                  "action": { "mask": { "keep_domain": true } } }]),
        json!({ "customers": [{ "email": ["ann@example.com", "secret-value"] }] }),
    );
    assert!(
        !out.contains("secret-value"),
        "denied value forwarded: {out}"
    );
}

/// Found by the same property: `mask` with `keep_last` (or `keep_first`) on an array or
/// object keeps the end (or start) of its JSON text, which can be a whole other value.
#[test]
fn a_mask_keeping_the_end_does_not_reveal_a_whole_value_of_a_structured_field() {
    let out = forwarded(
        json!([{ "path": "$.phone", "category": "user.contact.phone",
                  "action": { "mask": { "keep_last": 6 } } }]),
        json!({ "customers": [{ "phone": ["+4915112345678", "1234"] }] }),
    );
    assert!(!out.contains("1234"), "denied value forwarded: {out}");
}

#[test]
fn templates_write_every_index_as_a_wildcard() {
    assert_eq!(
        template("$.customers[3].a['x[1]'][2]"),
        "$.customers[*].a['x[1]'][*]"
    );
    assert_eq!(template("$['it\\'s'][10].b"), "$['it\\'s'][*].b");
    assert_eq!(template("header:x-email"), "header:x-email");
}
