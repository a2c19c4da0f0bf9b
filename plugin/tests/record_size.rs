//! The size of decision records v2 (issue part "Decision record v2"), measured on the
//! example policy (`policies/acme-customers.json`) and printed:
//!
//! ```sh
//! cargo test -p consentry --test record_size -- --nocapture
//! ```
//!
//! - the README's 1 KB message: `tests/e2e/fixtures/customers.json` (4 customers, about
//!   1.1 KB compact), which `envoy/bench/run`'s 1 KB workload is shaped like;
//! - the 16 KB / 42-record batch of `envoy/bench/run` (records shaped like the fixture's,
//!   made here deterministically in the same way);
//! - `plugin/benches/common/payload.rs`' 1 KB and 16 KB bodies (larger records);
//! - 1, 10, 100 and 1000 records, to show the growth: bytes per record fall.
//!
//! Each to `analytics` (legitimate interests: ids hashed, names redacted, contact data,
//! address and tax id stripped, phones masked, demographics allowed) and to
//! `marketing-email` (consent per record). The assertions are about shape and
//! completeness only (every field decision counted once, in a group; counts are the
//! groups' sums; every subject once), never about the sizes.

use consentry::engine::{
    parse_subject_ranges, subject_pseudonym, DecisionLog, Direction, Policy, StoreAnswers,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

#[path = "../benches/common/payload.rs"]
#[allow(dead_code)]
mod payload;

const HASH_KEY: &str = "size-hash-key-0123456789abcdef";
const SUBJECT_KEY: &str = "size-subject-key-0123456789abcdef";
/// An Envoy `x-request-id` is a UUID.
const REQUEST_ID: &str = "0b6f5a53-5f5e-4d7a-9a43-1c2d3e4f5a6b";
const PROFILE: &str = "spiffe://acme.internal/ns/core/sa/profile";
/// What the example binding declares: one decision per such key a record holds.
const DECLARED: [&str; 10] = [
    "id",
    "name",
    "email",
    "phone",
    "address",
    "birth_year",
    "country",
    "iban",
    "tax_id",
    "page_views",
];

fn env(name: &str) -> Option<String> {
    match name {
        "CONSENTRY_HASH_KEY" => Some(HASH_KEY.into()),
        "CONSENTRY_SUBJECT_KEY" => Some(SUBJECT_KEY.into()),
        _ => None,
    }
}

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn example_policy() -> Policy {
    let text = std::fs::read(root().join("policies/acme-customers.json")).unwrap();
    Policy::compile(&text, &env).unwrap_or_else(|e| panic!("{e}"))
}

fn fixture() -> Value {
    let text = std::fs::read(root().join("tests/e2e/fixtures/customers.json")).unwrap();
    serde_json::from_slice(&text).unwrap()
}

/// A record shaped like `envoy/bench/run`'s `customer(i)` (and the e2e fixture): the
/// same keys and value lengths, from a small deterministic generator instead of
/// Python's `random`.
fn bench_customer(i: usize) -> Value {
    const FIRST: [&str; 18] = [
        "Alice",
        "Bruno",
        "Chiara",
        "Dawit",
        "Emma",
        "Farid",
        "Greta",
        "Hugo",
        "Ines",
        "Jonas",
        "Katarzyna",
        "Luca",
        "Maja",
        "Nils",
        "Olga",
        "Pieter",
        "Rosa",
        "Sven",
    ];
    const LAST: [&str; 15] = [
        "Keller",
        "Ferreira",
        "Romano",
        "Bekele",
        "Dubois",
        "Haddad",
        "Lindqvist",
        "Moreau",
        "Novak",
        "Jansen",
        "Kowalska",
        "Bianchi",
        "Berg",
        "Olsen",
        "Petrova",
    ];
    const PLACES: [(&str, &str, &str, &str, &str); 7] = [
        ("DE", "Berlin", "Lindenstrasse", "10969", "+49151"),
        ("PT", "Lisboa", "Rua Augusta", "1100-053", "+351912"),
        ("IT", "Torino", "Via Roma", "10121", "+39347"),
        ("SE", "Uppsala", "Storgatan", "75320", "+46701"),
        ("FR", "Lyon", "Rue de la Republique", "69002", "+33612"),
        ("NL", "Utrecht", "Oudegracht", "3511", "+31612"),
        ("PL", "Krakow", "ulica Florianska", "31-019", "+48501"),
    ];
    const DOMAINS: [&str; 3] = ["example.com", "example.org", "example.net"];
    let mut state = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = |n: usize| {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    };
    let (first, last) = (FIRST[next(FIRST.len())], LAST[next(LAST.len())]);
    let (country, city, street, postcode, prefix) = PLACES[next(PLACES.len())];
    let mut rec = json!({
        "id": format!("c-{}", 100_000 + i),
        "name": format!("{first} {last}"),
        "email": format!("{}.{}{i}@{}", first.to_lowercase(), last.to_lowercase(), DOMAINS[next(3)]),
        "phone": format!("{prefix}{}", 1_000_000 + next(9_000_000)),
        "address": {"street": format!("{street} {}", 1 + next(199)), "city": city, "postcode": postcode},
        "birth_year": 1940 + next(66),
        "country": country,
        "page_views": next(500),
        "tax_id": format!("{country}-TAX-{}", 10_000_000 + next(90_000_000)),
    });
    if next(10) < 7 {
        rec["consents"] =
            json!({"marketing_email": next(2) == 0, "social_profiling": next(10) < 3});
    }
    rec
}

fn bench_batch(n: usize) -> Value {
    json!({ "customers": (0..n).map(bench_customer).collect::<Vec<_>>() })
}

/// The record of one request body to `cluster` (caller `profile` by its principal,
/// path `/v1/events`), with the consent store answering "unknown subject" for everyone
/// whose record does not answer for itself.
fn record(p: &Policy, cluster: &str, body: &[u8]) -> DecisionLog {
    let headers = vec![("content-type".to_string(), "application/json".to_string())];
    let ex = p.exchange(
        Some(REQUEST_ID.into()),
        "POST",
        "/v1/events",
        p.identify_caller(Some(PROFILE), None),
        p.identify_upstream(Some(cluster), None),
        &headers,
    );
    let plan = p
        .plan_body(
            &ex,
            Direction::Request,
            Some("application/json"),
            None,
            body,
        )
        .expect("inspectable");
    let mut store = StoreAnswers::new();
    for s in &plan.store_subjects {
        store.insert(s.clone(), consentry::engine::ConsentAnswer::Unknown);
    }
    let v = p.judge_body(&ex, Direction::Request, plan, &store);
    p.decision_log(&ex, Direction::Request, &v.report, None, 1_795_343_661_260)
}

/// Every field decision of `body` is in the record, once: per group the count is at
/// least its subjects; the sum of the counts is the number of declared keys the records
/// hold, per action as in `counts`; the subjects are the records' ids, each once, in
/// order; path templates carry no index.
fn check(log: &DecisionLog, body: &Value) {
    let records = body["customers"].as_array().unwrap();
    let declared: usize = records
        .iter()
        .map(|r| {
            r.as_object()
                .unwrap()
                .keys()
                .filter(|k| DECLARED.contains(&k.as_str()))
                .count()
        })
        .sum();
    let total: usize = log.decisions.iter().map(|g| g.n).sum();
    assert_eq!(total, declared, "every field decision is counted once");
    let mut sums: BTreeMap<&str, usize> = BTreeMap::new();
    for g in &log.decisions {
        *sums.entry(g.action).or_default() += g.n;
        assert!(g.subjects.len() <= g.n);
        assert_eq!(g.folded, 0);
        assert!(
            g.paths.iter().all(|p| p.starts_with("$.customers[*].")),
            "{g:?}"
        );
        // Each field of a group, at most once per record: its count is its subjects'.
        assert_eq!(g.n, g.subjects.len(), "{g:?}");
    }
    assert_eq!(
        sums,
        log.counts
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect::<BTreeMap<_, _>>()
    );
    let want: Vec<String> = records
        .iter()
        .map(|r| subject_pseudonym(SUBJECT_KEY.as_bytes(), r["id"].as_str().unwrap()))
        .collect();
    assert_eq!(log.subjects, want, "every subject once, first-seen order");
    assert_eq!(log.records, records.len());
    // The written form reads back: the ranges name the same subjects.
    let v: Value = serde_json::from_str(&log.to_json()).unwrap();
    assert_eq!(v["v"], 2);
    for (g, gv) in log.decisions.iter().zip(v["decisions"].as_array().unwrap()) {
        let back = gv["subjects"]
            .as_str()
            .map(|s| parse_subject_ranges(s).unwrap())
            .unwrap_or_default();
        assert_eq!(back, g.subjects);
    }
    // Per record and declared key: exactly one group names its subject at its template.
    for (i, r) in records.iter().enumerate() {
        for k in r.as_object().unwrap().keys() {
            if !DECLARED.contains(&k.as_str()) {
                continue;
            }
            let path = format!("$.customers[*].{k}");
            let holding = log
                .decisions
                .iter()
                .filter(|g| g.paths.contains(&path) && g.subjects.contains(&i))
                .count();
            assert_eq!(holding, 1, "record {i} {k}");
        }
    }
}

fn line_len(log: &DecisionLog) -> usize {
    // As Envoy's log carries it: the prefix, then the JSON.
    consentry::engine::LOG_PREFIX.len() + log.to_json().len()
}

#[test]
fn decision_record_sizes() {
    let p = example_policy();
    let mut out = String::from("\ndecision record v2 sizes (bytes of `consentry.decision {json}`, example policy, POST /v1/events from profile)\n");
    let cases: Vec<(String, Value)> = vec![
        (
            "README 1 KB message (tests/e2e/fixtures/customers.json, 4 customers)".into(),
            fixture(),
        ),
        (
            "envoy/bench 16 KB batch (42 records)".into(),
            bench_batch(42),
        ),
        (
            "benches/common/payload.rs 1KB".into(),
            serde_json::from_slice(&payload::batch(1024)).unwrap(),
        ),
        (
            "benches/common/payload.rs 16KB".into(),
            serde_json::from_slice(&payload::batch(16 * 1024)).unwrap(),
        ),
    ];
    out.push_str(&format!(
        "{:<72} {:>8} {:>7} {:>14} {:>14}\n",
        "body", "bytes", "records", "analytics", "marketing"
    ));
    for (label, body) in &cases {
        let bytes = serde_json::to_vec(body).unwrap();
        let a = record(&p, "analytics", &bytes);
        let m = record(&p, "marketing", &bytes);
        check(&a, body);
        check(&m, body);
        out.push_str(&format!(
            "{label:<72} {:>8} {:>7} {:>14} {:>14}\n",
            bytes.len(),
            body["customers"].as_array().unwrap().len(),
            line_len(&a),
            line_len(&m)
        ));
    }
    out.push_str(&format!(
        "\ngrowth (envoy/bench records)\n{:>7} {:>9} {:>11} {:>9} {:>11} {:>9}\n",
        "records", "body", "analytics", "B/record", "marketing", "B/record"
    ));
    let mut last = f64::INFINITY;
    for n in [1, 10, 100, 1000] {
        let body = bench_batch(n);
        let bytes = serde_json::to_vec(&body).unwrap();
        let a = record(&p, "analytics", &bytes);
        let m = record(&p, "marketing", &bytes);
        check(&a, &body);
        check(&m, &body);
        let per = line_len(&a) as f64 / n as f64;
        out.push_str(&format!(
            "{n:>7} {:>9} {:>11} {:>9.1} {:>11} {:>9.1}\n",
            bytes.len(),
            line_len(&a),
            per,
            line_len(&m),
            line_len(&m) as f64 / n as f64
        ));
        assert!(per < last, "bytes per record fall as the batch grows");
        last = per;
        // The groups do not grow with the batch: only the subject list does.
        let groups: BTreeSet<(&str, &str)> = a
            .decisions
            .iter()
            .map(|g| (g.category.as_str(), g.action))
            .collect();
        assert_eq!(groups.len(), a.decisions.len());
    }
    out.push_str("\nwhere the bytes go (analytics): facts (the record without subjects, decisions and counts), subjects, decisions (groups), counts\n");
    for (label, body) in cases.iter().take(2) {
        let log = record(&p, "analytics", &serde_json::to_vec(body).unwrap());
        let v: Value = serde_json::from_str(&log.to_json()).unwrap();
        let part = |k: &str| v.get(k).map_or(0, |x| x.to_string().len() + k.len() + 4);
        let groups = v["decisions"].as_array().unwrap();
        out.push_str(&format!(
            "{label:<72} facts {:>4}  subjects {:>4}  decisions {:>4} ({} groups, {:.0} B each)  counts {:>3}\n",
            line_len(&log) - part("subjects") - part("decisions") - part("counts") - part("records"),
            part("subjects"),
            part("decisions"),
            groups.len(),
            groups.iter().map(|g| g.to_string().len()).sum::<usize>() as f64 / groups.len() as f64,
            part("counts"),
        ));
    }
    let body = bench_batch(42);
    let line = format!(
        "{}{}",
        consentry::engine::LOG_PREFIX,
        record(&p, "analytics", &serde_json::to_vec(&body).unwrap()).to_json()
    );
    out.push_str(&format!("\nthe 42-record line to analytics:\n{line}\n"));
    println!("{out}");
}
