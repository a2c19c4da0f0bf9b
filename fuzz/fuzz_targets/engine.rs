//! Fuzz target `engine`: one message through the policy engine, the way the filter drives
//! it (plan_headers/judge_headers, plan_body/judge_body, decision_log).
//!
//! Input layout (every byte is used; short inputs get defaults):
//!
//! | byte | meaning |
//! | --- | --- |
//! | 0 | policy: index into [`policies`] |
//! | 1 | bit 0 direction (response if set), bits 1-3 caller, bits 4-6 upstream, bit 7 consent header |
//! | 2 | bits 0-2 path, bits 3-4 content-type, bits 5-6 content-encoding, bit 7 GET instead of POST |
//! | 3 | length L (mod 64) of the header blob that follows |
//! | 4..4+L | header blob: `consent-header|customer-id|customer-email` (lossy UTF-8) |
//! | 4+L | consent store seed: the answers for the subjects the store is asked about |
//! | rest | the body |
//!
//! Checks: nothing panics; an uninspectable body has a known status; a rewritten body is
//! JSON; every body decision names a node of the input; and no string that a `strip`
//! decision removed (one found once in the input, long enough not to occur by chance)
//! is in the output.

#![no_main]

use consentry::engine::push_path_key as push_key;
use consentry::engine::{ConsentAnswer, DecisionLog, Direction, Policy, Report, StoreAnswers};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

const ACME: &str = include_str!("../../policies/acme-customers.json");

fn env(name: &str) -> Option<String> {
    match name {
        "CONSENTRY_HASH_KEY" => Some("fuzz-hash-key-0123456789abcdef".into()),
        "CONSENTRY_SUBJECT_KEY" => Some("fuzz-subject-key-0123456789abcdef".into()),
        _ => None,
    }
}

/// The example policy and three variants of it: audit with fail open; data minimisation
/// with small limits; and a binding with `..`, wildcards, indexes, unions and every action.
fn policies() -> &'static [Policy] {
    static P: OnceLock<Vec<Policy>> = OnceLock::new();
    P.get_or_init(|| {
        let acme: Value = serde_json::from_str(ACME).expect("acme policy is JSON");
        let mut audit = acme.clone();
        audit["mode"] = json!("audit");
        audit["fail"] = json!("open");
        let mut minimise = acme.clone();
        minimise["undeclared"] = json!("strip");
        minimise["limits"] = json!({ "max_body_bytes": 4096, "max_depth": 6, "max_records": 4 });
        let mut selectors = acme.clone();
        selectors["default_action"] = json!("hash");
        selectors["redact_marker"] = json!("<removed>");
        selectors["messages"] = json!([{
            "name": "shapes",
            "paths": ["/v1/customers", "/v1/events"],
            "records": "$",
            "subject": "$.id",
            "consent": "$.consents",
            "fields": [
                { "path": "$..email", "category": "user.contact.email",
                  "action": { "mask": { "keep_first": 1, "keep_domain": true } } },
                { "path": "$.profile.*", "category": "user.name", "action": "redact" },
                { "path": "$.tags[0]", "category": "user.behavior" },
                { "path": "$.items[-1].iban", "category": "user.financial.bank_account", "action": "block" },
                { "path": "$..phone", "category": "user.contact.phone_number", "action": "strip" },
                { "path": "$['address','city']", "category": "user.contact.address", "action": "strip" },
                { "path": "$.customers[*].name", "category": "user.name",
                  "action": { "mask": { "keep_last": 2 } } },
                { "path": "$..*.tax_id", "category": "user.government_id", "action": "strip" }
            ],
            "message_subject": { "query": "customer" },
            "headers": [{ "name": "x-customer-email", "category": "user.contact.email", "action": "hash" }],
            "query": [{ "name": "email", "category": "user.contact.email", "action": "strip" }]
        }]);
        [acme, audit, minimise, selectors]
            .iter()
            .map(|v| {
                // Records with concrete paths, so that each decision names its node.
                Policy::compile(v.to_string().as_bytes(), &env)
                    .unwrap_or_else(|e| panic!("fixed policy does not compile: {e}"))
                    .with_exact_paths()
            })
            .collect()
    })
}

const CALLERS: [(Option<&str>, Option<&str>); 8] = [
    (None, None),
    (Some("spiffe://acme.internal/ns/core/sa/profile"), None),
    (Some("spiffe://acme.internal/ns/edge/sa/gateway"), None),
    (Some("spiffe://acme.internal/ns/marketing/sa/mailer"), None),
    (Some("spiffe://acme.internal/ns/data/sa/analytics"), None),
    (Some("spiffe://evil.example/sa/x"), None),
    (None, Some("support")),
    (Some("spiffe://evil.example/sa/x"), Some(" billing ")),
];

const UPSTREAMS: [(Option<&str>, Option<&str>); 8] = [
    (None, None),
    (Some("profile"), None),
    (Some("marketing"), None),
    (Some("analytics"), None),
    (Some("billing"), None),
    (Some("enrichment"), Some("support.acme.internal")),
    (None, Some("Support.ACME.internal:8443")),
    (Some("nowhere"), None),
];

const PATHS: [&str; 8] = [
    "/v1/customers",
    "/v1/customers?email=ann%40example.com&page=2",
    "/v1/events?customer=c-1001&email=",
    "/v1/tickets/12?email=a&email=b",
    "/v1/enrich",
    "/v1/other",
    "/v1/customersX",
    "/",
];

const CONTENT_TYPES: [Option<&str>; 4] = [
    Some("application/json"),
    Some("application/vnd.acme+json; charset=utf-8"),
    Some("text/plain"),
    None,
];

const ENCODINGS: [Option<&str>; 4] = [None, Some("identity"), Some("gzip"), Some("br")];

fn store_answers(subjects: &[String], seed: u8) -> StoreAnswers {
    let mut out = StoreAnswers::new();
    for (i, s) in subjects.iter().enumerate() {
        let bits = seed.rotate_left(u32::try_from(i % 8).unwrap_or(0) * 2) & 0b11;
        match bits {
            0 => {}
            1 => {
                out.insert(s.clone(), ConsentAnswer::Unknown);
            }
            _ => {
                let m: BTreeMap<String, bool> = [
                    ("marketing_email".to_string(), bits == 3),
                    ("social_profiling".to_string(), seed & 0x80 != 0),
                ]
                .into_iter()
                .collect();
                out.insert(s.clone(), ConsentAnswer::Known(m));
            }
        }
    }
    out
}

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

fn strings_in<'v>(v: &'v Value, out: &mut Vec<&'v str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| strings_in(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings_in(x, out)),
        _ => {}
    }
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() || needle.len() > hay.len() {
        return 0;
    }
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// No string a `strip` removed reaches the output. Only strings that occur once in the
/// input (as quoted JSON) and could not be produced by another action are checked.
fn check_strips(body: &[u8], out: &[u8], log: &DecisionLog) {
    let Ok(input) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let mut nodes = HashMap::new();
    index_nodes(&input, &mut "$".to_string(), &mut nodes);
    let canon = serde_json::to_vec(&input).unwrap_or_default();
    let decided = log
        .decisions
        .iter()
        .flat_map(|g| g.paths.iter().map(move |p| (p, g.action)));
    for (path, action) in decided {
        if path.starts_with("header:") || path.starts_with("query:") {
            continue;
        }
        let node = nodes.get(path.as_str());
        assert!(
            node.is_some(),
            "decision for {} which is not a node of the input",
            path
        );
        if action != "strip" {
            continue;
        }
        let mut strings = Vec::new();
        strings_in(node.unwrap(), &mut strings);
        for s in strings {
            if s.chars().count() < 8
                || s.contains('*')
                || s.starts_with("h1:")
                || s.contains("redact")
                || s == "<removed>"
            {
                continue;
            }
            let quoted = serde_json::to_vec(&Value::String(s.to_string())).unwrap_or_default();
            if count(&canon, &quoted) == 1 {
                assert_eq!(
                    count(out, &quoted),
                    0,
                    "{} was stripped but its value reaches the recipient",
                    path
                );
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let ps = policies();
    let p = &ps[usize::from(byte(0)) % ps.len()];
    let flags = byte(1);
    let req = byte(2);
    let blob_len = usize::from(byte(3) % 64);
    let blob_end = (4 + blob_len).min(data.len());
    let blob = String::from_utf8_lossy(data.get(4..blob_end).unwrap_or(&[])).into_owned();
    let store_seed = byte(blob_end);
    let body = data.get(blob_end + 1..).unwrap_or(&[]);

    let direction = if flags & 1 == 0 {
        Direction::Request
    } else {
        Direction::Response
    };
    let (principal, caller_header) = CALLERS[usize::from((flags >> 1) & 7)];
    let (cluster, authority) = UPSTREAMS[usize::from((flags >> 4) & 7)];
    let path = PATHS[usize::from(req & 7)];
    let content_type = CONTENT_TYPES[usize::from((req >> 3) & 3)];
    let encoding = ENCODINGS[usize::from((req >> 5) & 3)];
    let method = if req & 0x80 == 0 { "POST" } else { "GET" };

    let mut parts = blob.split('|');
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(c) = parts.next().filter(|_| flags & 0x80 != 0) {
        headers.push(("x-consentry-consent".into(), c.to_string()));
    }
    if let Some(id) = parts.next() {
        headers.push(("x-customer-id".into(), id.to_string()));
    }
    if let Some(mail) = parts.next() {
        headers.push(("x-customer-email".into(), mail.to_string()));
    }
    if let Some(h) = caller_header {
        headers.push(("x-consentry-caller".into(), h.to_string()));
    }

    let caller = p.identify_caller(principal, caller_header);
    let upstream = p.identify_upstream(cluster, authority);
    let ex = p.exchange(
        Some("fuzz".into()),
        method,
        path,
        caller,
        upstream,
        &headers,
    );

    // Headers and query.
    let hplan = p.plan_headers(&ex, direction, &headers);
    let hstore = store_answers(&hplan.store_subjects, store_seed);
    let hv = p.judge_headers(&ex, direction, &headers, &hstore);
    let hlog = p.decision_log(&ex, direction, &hv.report, None, 1_700_000_000_000);
    assert!(serde_json::from_str::<Value>(&hlog.to_json()).is_ok());
    for (name, _) in &hv.set_headers {
        assert!(
            headers.iter().any(|(k, _)| k == name),
            "rewrote header {name} that the message did not have"
        );
    }

    // Body.
    match p.plan_body(&ex, direction, content_type, encoding, body) {
        Ok(plan) => {
            let store = store_answers(&plan.store_subjects, store_seed);
            let v = p.judge_body(&ex, direction, plan, &store);
            let log = p.decision_log(&ex, direction, &v.report, None, 1_700_000_000_000);
            if let Some(out) = &v.body {
                assert!(
                    serde_json::from_slice::<Value>(out).is_ok(),
                    "output is not JSON"
                );
                if (encoding.is_none() || encoding == Some("identity"))
                    && log.decisions.iter().all(|g| g.folded == 0)
                {
                    check_strips(body, out, &log);
                }
            }
            assert!(serde_json::from_str::<Value>(&log.to_json()).is_ok());
            let counted: usize = log.decisions.iter().map(|g| g.n).sum();
            assert_eq!(counted, log.counts.values().sum::<usize>());
            if v.report.is_blocked() {
                let reply = p.block_response(&ex, direction, &v.report);
                assert!(serde_json::from_slice::<Value>(&reply).is_ok());
            }
        }
        Err(u) => {
            let status = u.status(direction);
            assert!(
                [400, 413, 415, 502, 503].contains(&status),
                "status {status} for {}",
                u.code()
            );
            let log = p.decision_log(&ex, direction, &Report::default(), Some(&u), 0);
            assert!(serde_json::from_str::<Value>(&log.to_json()).is_ok());
            let reply = p.uninspectable_response(&ex, direction, &u);
            assert!(serde_json::from_slice::<Value>(&reply).is_ok());
        }
    }
});
