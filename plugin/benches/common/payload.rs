//! Realistic customer-batch bodies for the benchmarks, shared by `plugin/benches/engine.rs`
//! and `harness/benches/wasm.rs` (included there with `#[path]`).
//!
//! Records look like `tests/e2e/fixtures/customers.json` (id, name, email, phone, an
//! address object, birth year, country, page views, tax id, a consents object) plus what
//! real customer services carry beside them: an orders array of objects, a tags array, a
//! preferences object and twenty further attributes `f0`..`f19` at several depths, which
//! the large benchmark policies declare with plain, bracket, wildcard and descendant
//! selectors. Everything is deterministic: the same size gives the same bytes.

use serde_json::{json, Value};

/// The payload matrix: label and target size in bytes.
#[allow(dead_code)]
pub const SIZES: [(&str, usize); 5] = [
    ("100B", 100),
    ("1KB", 1024),
    ("16KB", 16 * 1024),
    ("256KB", 256 * 1024),
    // Under the example policy's `limits.max_body_bytes` (1 MiB).
    ("1MB", 1_000_000),
];

const FIRST: [&str; 12] = [
    "Alice", "Bruno", "Chiara", "Dawit", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
    "Kemal", "Lucia",
];
const LAST: [&str; 10] = [
    "Keller",
    "Ferreira",
    "Romano",
    "Bekele",
    "Novak",
    "Haddad",
    "Lindqvist",
    "Tanaka",
    "Moreau",
    "Schmidt",
];
const CITIES: [(&str, &str); 6] = [
    ("Berlin", "DE"),
    ("Lisboa", "PT"),
    ("Torino", "IT"),
    ("Uppsala", "SE"),
    ("Lyon", "FR"),
    ("Gdansk", "PL"),
];
const STREETS: [&str; 5] = [
    "Lindenstrasse",
    "Rua Augusta",
    "Via Roma",
    "Storgatan",
    "Rue Neuve",
];

/// One full customer record, about 1 KB serialised.
pub fn record(i: usize) -> Value {
    let first = FIRST[i % FIRST.len()];
    let last = LAST[(i / 3) % LAST.len()];
    let (city, country) = CITIES[i % CITIES.len()];
    let lang = ["de", "pt", "it", "sv"][i % 4];
    let orders: Vec<Value> = (0..1 + i % 3)
        .map(|o| {
            json!({
                "sku": format!("SKU-{:05}", (i * 31 + o * 7) % 100_000),
                "amount": ((i * 13 + o * 5) % 20_000) as f64 / 100.0,
                "currency": "EUR",
                "f7": format!("channel-{}", o % 4),
                "f17": (i + o) % 2 == 0,
            })
        })
        .collect();
    let mut r = json!({
        "id": format!("c-{}", 100_000 + i),
        "name": format!("{first} {last}"),
        "email": format!("{}.{}{}@example.com", first.to_lowercase(), last.to_lowercase(), i),
        "phone": format!("+49151{:08}", (i * 7919) % 100_000_000),
        "address": {
            "street": format!("{} {}", STREETS[i % STREETS.len()], i % 200 + 1),
            "city": city,
            "postcode": format!("{:05}", (i * 97) % 100_000),
            "f6": format!("district-{}", i % 12),
            "f16": i % 9,
        },
        "birth_year": 1940 + (i % 65),
        "country": country,
        "page_views": (i * 37) % 1000,
        "consents": { "marketing_email": i % 3 == 0, "social_profiling": i % 5 == 0 },
        "orders": orders,
        "tags": ["newsletter", if i % 2 == 0 { "vip" } else { "standard" }],
        "f0": format!("segment-{}", i % 7),
        "f1": i % 100,
        "f2": i % 2 == 0,
        "f3": format!("2026-{:02}-{:02}", i % 12 + 1, i % 28 + 1),
        "f4": (i % 1000) as f64 / 10.0,
        "f8": format!("src-{}", i % 5),
        "f10": "basic",
        "f11": i % 17,
        "f12": format!("ref-{i:06}"),
        "f13": null,
        "f14": i % 3 == 0,
        "f18": format!("lang-{lang}"),
        "prefs": {
            "language": lang,
            "f5": "dark",
            "f9": i % 4,
            "f15": "weekly",
            "f19": ["email", "sms"],
        },
    });
    if i % 4 == 0 {
        r["tax_id"] = json!(format!("DE-TAX-{:08}", 55_500_000 + i));
    }
    r
}

/// A minimal record, for the ~100 byte message.
fn tiny_record() -> Value {
    json!({ "id": "c-100000", "name": "Ann Keller", "email": "ann@example.com", "birth_year": 1987 })
}

/// A `{"customers": [...], "page": 1}` body of about `target` bytes (never more, at
/// least one record).
pub fn batch(target: usize) -> Vec<u8> {
    let overhead = br#"{"customers":[],"page":1}"#.len();
    let records: Vec<Value> = if target < 400 {
        vec![tiny_record()]
    } else {
        let mut out = Vec::new();
        let mut len = overhead;
        loop {
            let r = record(out.len());
            let n = serde_json::to_vec(&r).map(|v| v.len()).unwrap_or(0) + 1;
            if !out.is_empty() && len + n > target {
                break;
            }
            len += n;
            out.push(r);
        }
        out
    };
    serde_json::to_vec(&json!({ "customers": records, "page": 1 })).unwrap_or_default()
}
