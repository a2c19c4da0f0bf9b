//! The real consentry .wasm in the emulated host with the example policy. Needs the
//! module built first (`cargo build --release --target wasm32-wasip1 -p consentry`;
//! scripts/test does it before `cargo test`).

use consentry_harness::host::{Fate, Settings};
use consentry_harness::replay::{LoadedPolicy, Runner};
use consentry_harness::traffic::{self, Message, Recording, StoreBehaviour};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn wasm() -> PathBuf {
    let p = root().join("target/wasm32-wasip1/release/consentry.wasm");
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --release --target wasm32-wasip1 -p consentry` first",
        p.display()
    );
    p
}

fn runner(settings: Settings) -> Runner {
    let policy = LoadedPolicy::read(&root().join("policies/acme-customers.json")).unwrap();
    Runner::new(&wasm(), policy, settings).unwrap()
}

fn post(authority: &str, path: &str, caller: &str, body: &Value) -> Recording {
    let b = body.to_string().into_bytes();
    Recording {
        source: "test".into(),
        request: Message {
            headers: vec![
                (":method".into(), "POST".into()),
                (":path".into(), path.into()),
                (":authority".into(), authority.into()),
                ("x-consentry-caller".into(), caller.into()),
                ("content-type".into(), "application/json".into()),
                ("content-length".into(), b.len().to_string()),
            ],
            body: b,
            ..Message::default()
        },
        response: Some(Message {
            headers: vec![
                (":status".into(), "200".into()),
                ("content-type".into(), "application/json".into()),
            ],
            body: br#"{"ok":true}"#.to_vec(),
            ..Message::default()
        }),
        ..Recording::default()
    }
}

fn batch() -> Value {
    json!({ "customers": [
        { "id": "c-1", "name": "Ann", "email": "ann@example.com", "phone": "+4915112345678", "birth_year": 1980, "consents": { "marketing_email": true } },
        { "id": "c-2", "name": "Bob", "email": "bob@example.com", "phone": "+4915112345679", "birth_year": 1990 }
    ]})
}

fn upstream_body(r: &consentry_harness::replay::Replayed) -> Value {
    let Fate::Forwarded(d) = &r.raw.request else {
        panic!("not forwarded: {:?}", r.raw.request)
    };
    serde_json::from_slice(&d.body).unwrap()
}

#[test]
fn the_sample_traffic_meets_its_expectations() {
    let mut r = runner(Settings {
        strict: true,
        ..Settings::default()
    });
    let dir = root().join("tests/traffic");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut n = 0;
    for f in files {
        for rec in traffic::load_path(&f).unwrap_or_else(|e| panic!("{e}")) {
            let x = r.run(&rec).unwrap();
            assert!(x.passed(), "{}: {:#?}", x.label(), x.mismatches);
            n += 1;
        }
    }
    assert!(n >= 6, "only {n} sample exchanges");
}

#[test]
fn per_record_consent_reaches_the_upstream_and_the_log() {
    let mut r = runner(Settings::default());
    let mut rec = post(
        "marketing.acme.internal",
        "/v1/campaigns",
        "profile",
        &batch(),
    );
    rec.cluster = Some("marketing".into());
    let x = r.run(&rec).unwrap();
    let got = upstream_body(&x);
    assert_eq!(got["customers"][0]["email"], "ann@example.com");
    assert!(got["customers"][1].get("email").is_none());
    assert_eq!(got["customers"][1]["name"], "[redacted]");
    let d = x.request.decision.as_ref().expect("a decision");
    assert_eq!(d["outcome"], "modified");
    assert_eq!(d["recipient"], "marketing-email");
    // A decision record v2: two subjects; c-1's e-mail allowed by its record, c-2's
    // stripped for want of consent (the store knows nothing of it).
    assert_eq!(d["v"], 2);
    assert_eq!(d["records"], 2);
    let subjects = d["subjects"].as_array().unwrap();
    assert_eq!(subjects.len(), 2);
    assert!(subjects
        .iter()
        .all(|s| s.as_str().unwrap().starts_with("s2:")));
    let email = |action: &str| {
        d["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["category"] == "user.contact.email" && g["action"] == action)
            .cloned()
            .unwrap_or_else(|| panic!("no {action} e-mail group in {d}"))
    };
    let allowed = email("allow");
    assert_eq!(allowed["paths"], json!(["$.customers[*].email"]));
    assert_eq!(
        (allowed["n"].clone(), allowed["subjects"].clone()),
        (json!(1), json!("0"))
    );
    assert_eq!(allowed["evidence"], "record:$.consents.marketing_email");
    let stripped = email("strip");
    assert_eq!(
        (stripped["n"].clone(), stripped["subjects"].clone()),
        (json!(1), json!("1"))
    );
    assert_eq!(stripped["reason"], "no_consent");
    // Filter state for the access log, and counters, as Envoy would show them.
    let fs = x
        .raw
        .filter_state
        .get("wasm.consentry_decision")
        .expect("filter state");
    assert!(fs.starts_with('[') && fs.contains("\"outcome\":\"modified\""));
    assert_eq!(
        x.raw
            .filter_state
            .get("wasm.consentry_outcome")
            .map(String::as_str),
        Some("modified")
    );
    assert!(
        !format!("{:?}", x.raw.logs).contains("bob@example.com"),
        "no values in logs"
    );
    // c-2 has no consent in its record: the store was asked about it, and only it.
    assert_eq!(x.raw.http_calls.len(), 1);
    assert_eq!(x.raw.http_calls[0].cluster, "consent_store");
    let asked: Value = serde_json::from_slice(&x.raw.http_calls[0].body).unwrap();
    assert_eq!(asked, json!({ "subjects": ["c-2"] }));
}

#[test]
fn the_consent_store_answer_is_cached_across_exchanges() {
    let mut r = runner(Settings::default());
    let mut rec = post(
        "marketing.acme.internal",
        "/v1/campaigns",
        "profile",
        &batch(),
    );
    rec.store = StoreBehaviour::Answer(
        [(
            "c-2".to_string(),
            [("marketing_email".to_string(), true)].into(),
        )]
        .into(),
    );
    let first = r.run(&rec).unwrap();
    assert_eq!(
        upstream_body(&first)["customers"][1]["email"],
        "bob@example.com"
    );
    rec.store = StoreBehaviour::Down;
    let second = r.run(&rec).unwrap();
    assert!(
        second.raw.http_calls.is_empty(),
        "answered from the shared-data cache"
    );
    assert_eq!(
        upstream_body(&second)["customers"][1]["email"],
        "bob@example.com"
    );
}

#[test]
fn a_consent_store_that_fails_refuses_the_message() {
    for behaviour in [
        StoreBehaviour::Timeout,
        StoreBehaviour::Down,
        StoreBehaviour::Status(500),
        StoreBehaviour::Garbage,
    ] {
        let mut r = runner(Settings::default());
        let mut rec = post(
            "marketing.acme.internal",
            "/v1/campaigns",
            "profile",
            &batch(),
        );
        rec.store = behaviour.clone();
        let x = r.run(&rec).unwrap();
        assert_eq!(x.request.fate, "replied", "{behaviour:?}");
        assert_eq!(x.request.status, Some(503), "{behaviour:?}");
        assert_eq!(
            x.request.decision.as_ref().unwrap()["outcome"],
            "uninspectable"
        );
    }
}

#[test]
fn chunked_bodies_give_the_same_result_as_one_chunk() {
    let rec = post("analytics.acme.internal", "/v1/events", "profile", &batch());
    let whole = runner(Settings::default()).run(&rec).unwrap();
    for chunk in [1, 7, 64] {
        let x = runner(Settings {
            chunk_size: chunk,
            ..Settings::default()
        })
        .run(&rec)
        .unwrap();
        assert_eq!(
            upstream_body(&x),
            upstream_body(&whole),
            "chunk size {chunk}"
        );
    }
}

#[test]
fn a_blocked_response_is_replaced_with_the_refusal() {
    let mut r = runner(Settings::default());
    let mut rec = post(
        "profile.acme.internal",
        "/v1/customers",
        "analytics",
        &json!({}),
    );
    rec.request.headers[0].1 = "GET".into();
    rec.request.body.clear();
    rec.request
        .headers
        .retain(|(k, _)| k != "content-length" && k != "content-type");
    rec.response.as_mut().unwrap().body =
        json!({ "customers": [ { "id": "c-1", "iban": "DE89370400440532013000" } ] })
            .to_string()
            .into_bytes();
    let x = r.run(&rec).unwrap();
    assert_eq!(x.response.fate, "replied");
    assert_eq!(x.response.status, Some(403));
    let client = x.raw.client.as_ref().unwrap();
    assert!(
        !String::from_utf8_lossy(&client.body).contains("DE89"),
        "the value never reaches the caller"
    );
}

#[test]
fn the_filter_makes_only_calls_the_host_models() {
    // Strict mode fails on any host call outside the model; the filter must pass.
    let mut r = runner(Settings {
        strict: true,
        trace: true,
        ..Settings::default()
    });
    let x = r
        .run(&post(
            "analytics.acme.internal",
            "/v1/events",
            "profile",
            &batch(),
        ))
        .unwrap();
    assert!(x.trap.is_none(), "{:?}", x.trap);
    assert!(
        x.raw
            .trace
            .iter()
            .any(|t| t.starts_with("set_buffer_bytes(0, 0,")),
        "{:#?}",
        x.raw.trace
    );
}
