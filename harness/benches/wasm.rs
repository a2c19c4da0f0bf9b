//! The same customer batches as `plugin/benches/engine.rs`, through the real `.wasm` in
//! the harness's wasmtime host with the example policy (`policies/acme-customers.json`),
//! to the rewriting recipient `analytics`: `replay` is a whole `Runner::run` (what
//! `consentry replay` pays per exchange: request and response callbacks, the host's
//! copies, reading the decision lines back), `vm` the VM's exchange alone. Beside them,
//! starting the harness: `Plugin::load` (read, validate and Cranelift-compile the module)
//! and `Plugin::start` (instantiate, `on_vm_start`, `on_configure` compiling the policy).
//!
//! Needs the module: `cargo build --release --target wasm32-wasip1 -p consentry`.
//! Run: `cargo bench -p consentry-harness --bench wasm`. Results:
//! `plugin/benches/RESULTS.md`.

use consentry_harness::host::{Delivered, ExchangeInput, Fate, Plugin, Settings};
use consentry_harness::replay::{LoadedPolicy, Runner, REPLAY_HASH_KEY, REPLAY_SUBJECT_KEY};
use consentry_harness::traffic::{Message, Recording};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[path = "../../plugin/benches/common/payload.rs"]
mod payload;

#[path = "../../plugin/benches/common/cputime.rs"]
mod cputime;
use cputime::CpuTime;

/// The sizes measured through the `.wasm`.
const WASM_SIZES: [&str; 3] = ["1KB", "16KB", "256KB"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn wasm() -> PathBuf {
    let p = root().join("target/wasm32-wasip1/release/consentry.wasm");
    if !p.is_file() {
        eprintln!(
            "error: {} is missing.\n\
             Build the filter first: cargo build --release --target wasm32-wasip1 -p consentry",
            p.display()
        );
        std::process::exit(2);
    }
    p
}

fn policy() -> LoadedPolicy {
    LoadedPolicy::read(&root().join("policies/acme-customers.json"))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

const HOST: &str = "analytics.acme.internal";
const PATH: &str = "/v1/events";
const RESPONSE: &[u8] = br#"{"ok":true}"#;
/// The caller, `profile`, by its mTLS principal in the example policy.
const PROFILE: &str = "spiffe://acme.internal/ns/core/sa/profile";

fn request_headers(body: &[u8]) -> Vec<(String, String)> {
    vec![
        (":method".into(), "POST".into()),
        (":path".into(), PATH.into()),
        (":authority".into(), HOST.into()),
        ("content-type".into(), "application/json".into()),
        ("content-length".into(), body.len().to_string()),
    ]
}

fn response_headers() -> Vec<(String, String)> {
    vec![
        (":status".into(), "200".into()),
        ("content-type".into(), "application/json".into()),
    ]
}

/// A POST of `body` from `profile` to `analytics`, which gets it rewritten.
fn recording(body: &[u8]) -> Recording {
    Recording {
        source: "bench".into(),
        cluster: Some("analytics".into()),
        peer_principal: Some(PROFILE.into()),
        request: Message {
            headers: request_headers(body),
            body: body.to_vec(),
            ..Message::default()
        },
        response: Some(Message {
            headers: response_headers(),
            body: RESPONSE.to_vec(),
            ..Message::default()
        }),
        ..Recording::default()
    }
}

/// The same exchange as the host's input, as `Runner` builds it.
fn input(body: &[u8]) -> ExchangeInput {
    let mut properties = BTreeMap::new();
    for (k, v) in [
        ("xds.cluster_name", "analytics"),
        ("request.path", PATH),
        ("request.url_path", PATH),
        ("request.method", "POST"),
        ("request.host", HOST),
        ("connection.uri_san_peer_certificate", PROFILE),
    ] {
        properties.insert(k.to_string(), v.as_bytes().to_vec());
    }
    properties.insert(
        "request.size".into(),
        (body.len() as i64).to_le_bytes().to_vec(),
    );
    ExchangeInput {
        request_headers: request_headers(body),
        request_body: body.to_vec(),
        request_trailers: Vec::new(),
        response: Some(Delivered {
            headers: response_headers(),
            body: RESPONSE.to_vec(),
            trailers: Vec::new(),
        }),
        properties,
    }
}

/// Settings as `Runner::new` makes them: the replay keys, the policy's clusters.
fn settings(policy: &LoadedPolicy) -> Settings {
    let mut s = Settings::default();
    s.env
        .push(("CONSENTRY_HASH_KEY".into(), REPLAY_HASH_KEY.into()));
    s.env
        .push(("CONSENTRY_SUBJECT_KEY".into(), REPLAY_SUBJECT_KEY.into()));
    s.clusters.extend(policy.clusters());
    s
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

fn bench_exchange(c: &mut Criterion<CpuTime>) {
    let wasm = wasm();
    let policy = policy();
    let mut runner =
        Runner::new(&wasm, policy.clone(), Settings::default()).unwrap_or_else(|e| panic!("{e:#}"));
    let plugin = Plugin::load(&wasm).unwrap_or_else(|e| panic!("{e:#}"));
    let mut vm = plugin
        .start(settings(&policy), &policy.json)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut no_calls = |_: &consentry_harness::host::HttpCall| None;
    for label in WASM_SIZES {
        let (_, target) = payload::SIZES
            .iter()
            .find(|(l, _)| *l == label)
            .expect("a payload size");
        let body = payload::batch(*target);
        let rec = recording(&body);
        let inp = input(&body);
        // The message really is rewritten, by both paths.
        let r = runner.run(&rec).unwrap_or_else(|e| panic!("{e:#}"));
        match &r.raw.request {
            Fate::Forwarded(d) => assert!(d.body != body, "{label}: not rewritten"),
            other => panic!("{label}: not forwarded: {other:?}"),
        }
        assert_eq!(
            r.request.decision.as_ref().map(|d| d["outcome"].clone()),
            Some("modified".into()),
            "{label}"
        );
        let out = vm.run(&inp, &mut no_calls);
        assert!(out.trap.is_none(), "{label}: {:?}", out.trap);
        assert!(matches!(&out.request, Fate::Forwarded(d) if d.body != body));

        let mut g = c.benchmark_group(format!("wasm/{label}"));
        g.throughput(Throughput::Bytes(body.len() as u64));
        if body.len() >= 256 * 1024 {
            g.sampling_mode(SamplingMode::Flat);
        }
        g.bench_function(BenchmarkId::new("replay", "analytics"), |b| {
            b.iter(|| {
                runner
                    .run(black_box(&rec))
                    .map(|r| r.mismatches.len())
                    .unwrap_or(usize::MAX)
            })
        });
        g.bench_function(BenchmarkId::new("vm", "analytics"), |b| {
            b.iter(|| vm.run(black_box(&inp), &mut no_calls).logs.len())
        });
        g.finish();
    }
}

fn bench_start(c: &mut Criterion<CpuTime>) {
    let wasm = wasm();
    let policy = policy();
    let settings = settings(&policy);
    let mut g = c.benchmark_group("harness");
    // Each load compiles the whole module: a fraction of a second to seconds.
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("plugin_load", |b| {
        b.iter(|| Plugin::load(black_box(&wasm)).is_ok())
    });
    let plugin = Plugin::load(&wasm).unwrap_or_else(|e| panic!("{e:#}"));
    g.bench_function("plugin_start", |b| {
        b.iter(|| {
            plugin
                .start(settings.clone(), black_box(&policy.json))
                .is_ok()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_exchange, bench_start
}
criterion_main!(benches);
