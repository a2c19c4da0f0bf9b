//! The policy engine natively, over a payload matrix (about 100 B to 1 MB of customer
//! records) and policies of 5, 10 (the example policy), 50 and 500 field selectors, for a
//! recipient whose messages are rewritten (`analytics`) and one that needs no change
//! (`profile`). Beside each size, the floor: serde_json parse + serialise of the same
//! bytes. The decision log (`decision_log(..).to_json()`) is measured on its own, and the
//! whole native message path (exchange, plan, judge, log) for the example policy, to
//! compare with the same messages through the `.wasm` (`harness/benches/wasm.rs`).
//!
//! Run: `cargo bench -p consentry --bench engine` (a filter narrows it, e.g.
//! `-- 'engine/16KB'`). Results and how to read them: `plugin/benches/RESULTS.md`.

use consentry::engine::{Direction, Exchange, Policy, StoreAnswers};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use serde_json::{json, Value};
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

#[path = "common/payload.rs"]
mod payload;

#[path = "common/cputime.rs"]
mod cputime;
use cputime::CpuTime;

const HASH_KEY: &str = "bench-hash-key-0123456789abcdef";
const SUBJECT_KEY: &str = "bench-subject-key-0123456789abcdef";

fn env(name: &str) -> Option<String> {
    match name {
        "CONSENTRY_HASH_KEY" => Some(HASH_KEY.into()),
        "CONSENTRY_SUBJECT_KEY" => Some(SUBJECT_KEY.into()),
        _ => None,
    }
}

fn example_policy() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/acme-customers.json");
    let text =
        std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `n`-th generated field selector of the large policies: plain names, bracket
/// names, wildcards and descendants, over five categories and four actions. Those with
/// `j < 20` match the attributes `f0`..`f19` that every benchmark record carries.
fn generated_field(j: usize) -> Value {
    let path = match j % 10 {
        0..=4 => format!("$.f{j}"),
        5 => format!("$.prefs.f{j}"),
        6 => format!("$..f{j}"),
        7 => format!("$.orders[*].f{j}"),
        8 => format!("$['f{j}']"),
        _ => format!("$.*.f{j}"),
    };
    let category = [
        "user.demographic.segment",
        "user.behavior.activity",
        "user.contact.handle",
        "user.financial.account",
        "user.preferences.setting",
    ][j % 5];
    let mut f = json!({ "path": path, "category": category });
    match j % 4 {
        1 => f["action"] = json!("redact"),
        2 => f["action"] = json!("hash"),
        3 => f["action"] = json!({ "mask": { "keep_last": 2 } }),
        _ => {} // the policy's default action (strip)
    }
    f
}

/// The benchmark policies: the example policy with its binding's field list replaced.
fn policies() -> Vec<(&'static str, Value)> {
    let base = example_policy();
    let example_fields = base["messages"][0]["fields"]
        .as_array()
        .cloned()
        .expect("the example policy has fields");
    let with_fields = |fields: Vec<Value>| {
        let mut p = base.clone();
        p["messages"][0]["fields"] = Value::Array(fields);
        p
    };
    // Five of the example's fields: hash, redact, strip, mask, and one analytics may see.
    let p5: Vec<Value> = example_fields
        .iter()
        .filter(|f| {
            matches!(
                f["path"].as_str(),
                Some("$.id" | "$.name" | "$.email" | "$.phone" | "$.birth_year")
            )
        })
        .cloned()
        .collect();
    assert_eq!(p5.len(), 5);
    let large = |n: usize| {
        let mut fields = example_fields.clone();
        fields.extend((0..n - fields.len()).map(generated_field));
        with_fields(fields)
    };
    vec![
        ("p5", with_fields(p5)),
        ("p10-example", base.clone()),
        ("p50", large(50)),
        ("p500", large(500)),
    ]
}

fn compile(v: &Value) -> Policy {
    Policy::compile(v.to_string().as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"))
}

/// The recipients: `analytics` gets most fields stripped, redacted, hashed or masked;
/// `profile` (purpose `essential.account`, allows `user`) gets everything unchanged.
const RECIPIENTS: [&str; 2] = ["analytics", "profile"];

/// The example policy's principal of `profile`.
const PROFILE: &str = "spiffe://acme.internal/ns/core/sa/profile";

/// A request from `profile` (by its mTLS principal) to the service behind `cluster`, on
/// a path the example binding covers.
fn exchange(p: &Policy, cluster: &str) -> Exchange {
    let headers = vec![("content-type".to_string(), "application/json".to_string())];
    p.exchange(
        Some("bench-req-1".into()),
        "POST",
        "/v1/events",
        p.identify_caller(Some(PROFILE), None),
        p.identify_upstream(Some(cluster), None),
        &headers,
    )
}

/// What the filter does with a request body: plan, then judge (no store answers are
/// needed: neither recipient has a consent purpose). Returns the new body's length.
fn inspect(p: &Policy, ex: &Exchange, body: &[u8]) -> usize {
    let plan = p
        .plan_body(ex, Direction::Request, Some("application/json"), None, body)
        .expect("the benchmark body is inspectable");
    let v = p.judge_body(ex, Direction::Request, plan, &StoreAnswers::new());
    assert!(!v.report.is_blocked());
    v.body.map_or(0, |b| b.len())
}

fn serde_floor(body: &[u8]) -> usize {
    let v: Value = serde_json::from_slice(body).expect("valid JSON");
    serde_json::to_vec(&v).expect("serialisable").len()
}

/// Short runs (a shared 2-core machine), measured in CPU time (see `common/cputime.rs`).
fn config() -> Criterion<CpuTime> {
    Criterion::default()
        .with_measurement(CpuTime)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(20)
        .nresamples(20_000)
        .without_plots()
}

fn sampling(size: usize) -> SamplingMode {
    // Long iterations: the same count per sample keeps a 1 MB run within its time.
    if size >= 256 * 1024 {
        SamplingMode::Flat
    } else {
        SamplingMode::Auto
    }
}

fn bench_engine(c: &mut Criterion<CpuTime>) {
    let policies: Vec<(&str, Policy)> = policies()
        .iter()
        .map(|(name, v)| (*name, compile(v)))
        .collect();
    for (label, target) in payload::SIZES {
        let body = payload::batch(target);
        let mut g = c.benchmark_group(format!("engine/{label}"));
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.sampling_mode(sampling(body.len()));
        g.bench_function("serde_floor", |b| b.iter(|| serde_floor(black_box(&body))));
        for (pname, p) in &policies {
            for to in RECIPIENTS {
                let ex = exchange(p, to);
                // A rewriting recipient must really rewrite, the other must not.
                let changed = inspect(p, &ex, &body) > 0;
                assert_eq!(changed, to == "analytics", "{pname} {to} {label}");
                g.bench_with_input(BenchmarkId::new(*pname, to), &body, |b, body| {
                    b.iter(|| inspect(p, &ex, black_box(body)))
                });
            }
        }
        g.finish();
    }
}

fn bench_log(c: &mut Criterion<CpuTime>) {
    let policies: Vec<(&str, Policy)> = policies()
        .iter()
        .map(|(name, v)| (*name, compile(v)))
        .collect();
    for (label, target) in payload::SIZES {
        let body = payload::batch(target);
        let mut g = c.benchmark_group(format!("log/{label}"));
        for (pname, p) in &policies {
            let to = "analytics";
            let ex = exchange(p, to);
            let plan = p
                .plan_body(
                    &ex,
                    Direction::Request,
                    Some("application/json"),
                    None,
                    &body,
                )
                .expect("inspectable");
            let report = p
                .judge_body(&ex, Direction::Request, plan, &StoreAnswers::new())
                .report;
            let line = p
                .decision_log(&ex, Direction::Request, &report, None, 1_795_343_661_260)
                .to_json();
            // Throughput here is the log line's bytes, not the body's.
            g.throughput(Throughput::Bytes(line.len() as u64));
            g.bench_function(BenchmarkId::new(*pname, to), |b| {
                b.iter(|| {
                    p.decision_log(
                        &ex,
                        Direction::Request,
                        black_box(&report),
                        None,
                        1_795_343_661_260,
                    )
                    .to_json()
                    .len()
                })
            });
        }
        g.finish();
    }
}

/// The whole native path of one request body, as the filter runs it: the exchange from
/// the request's facts, plan, judge, the decision log line. The native counterpart of
/// `wasm/*` in `harness/benches/wasm.rs` (example policy, `analytics`).
fn bench_message(c: &mut Criterion<CpuTime>) {
    let p = compile(&example_policy());
    let headers = vec![
        ("content-type".to_string(), "application/json".to_string()),
        ("x-consentry-caller".to_string(), "profile".to_string()),
    ];
    for (label, target) in payload::SIZES {
        let body = payload::batch(target);
        let mut g = c.benchmark_group(format!("message/{label}"));
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.sampling_mode(sampling(body.len()));
        g.bench_with_input(
            BenchmarkId::new("p10-example", "analytics"),
            &body,
            |b, body| {
                b.iter(|| {
                    let ex = p.exchange(
                        Some("bench-req-1".into()),
                        "POST",
                        "/v1/events",
                        p.identify_caller(Some(PROFILE), None),
                        p.identify_upstream(Some("analytics"), None),
                        &headers,
                    );
                    let plan = p
                        .plan_body(
                            &ex,
                            Direction::Request,
                            Some("application/json"),
                            None,
                            black_box(body),
                        )
                        .expect("inspectable");
                    let v = p.judge_body(&ex, Direction::Request, plan, &StoreAnswers::new());
                    let line = p
                        .decision_log(&ex, Direction::Request, &v.report, None, 1_795_343_661_260)
                        .to_json();
                    v.body.map_or(0, |b| b.len()) + line.len()
                })
            },
        );
        g.finish();
    }
}

/// Compiling a policy (once per `on_configure`), for scale.
fn bench_compile(c: &mut Criterion<CpuTime>) {
    let mut g = c.benchmark_group("compile");
    for (name, v) in policies() {
        let text = v.to_string().into_bytes();
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| Policy::compile(black_box(&text), &env).is_ok())
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_engine, bench_log, bench_message, bench_compile
}
criterion_main!(benches);
