//! Replaying recordings through the real `.wasm` in the emulated host, and checking
//! what came out against what a recording expects.

use crate::host::{
    CallAnswer, Delivered, ExchangeInput, ExchangeOutput, Fate, HttpCall, Plugin, Settings, Vm,
};
use crate::traffic::{DirectionExpectation, Recording, StoreBehaviour};
use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Keys the harness gives the filter unless told otherwise. Pseudonyms in replay output
/// are made with these, never with production keys.
pub const REPLAY_HASH_KEY: &str = "consentry-replay-hash-key-not-secret";
pub const REPLAY_SUBJECT_KEY: &str = "consentry-replay-subject-key-not-secret";

/// The prefix of decision log lines.
pub use consentry::engine::LOG_PREFIX as DECISION_PREFIX;

/// A policy ready to hand to the filter.
#[derive(Debug, Clone)]
pub struct LoadedPolicy {
    pub file: String,
    /// The policy as JSON, as Envoy's plugin configuration carries it.
    pub json: Vec<u8>,
    pub value: Value,
}

impl LoadedPolicy {
    /// Reads a policy in JSON or YAML.
    pub fn read(path: &Path) -> Result<LoadedPolicy> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read policy {}", path.display()))?;
        let (value, _) = crate::yamlpos::parse(&text).map_err(|e| {
            anyhow::anyhow!("{}:{}:{}: {}", path.display(), e.line, e.column, e.message)
        })?;
        Ok(LoadedPolicy {
            file: path.display().to_string(),
            json: serde_json::to_vec(&value)?,
            value,
        })
    }

    fn store_cluster(&self) -> Option<String> {
        self.value
            .pointer("/consent/store/cluster")
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    /// Every cluster the policy refers to: Envoy must define them all.
    pub fn clusters(&self) -> Vec<String> {
        let mut out: Vec<String> = self.store_cluster().into_iter().collect();
        if let Some(services) = self.value.get("services").and_then(Value::as_object) {
            for s in services.values() {
                for c in s
                    .get("clusters")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(c) = c.as_str() {
                        out.push(c.to_string());
                    }
                }
            }
        }
        out
    }
}

/// The harness's VM, restarted after a trap, with the settings it was made with.
pub struct Runner {
    plugin: Plugin,
    /// The module, named in errors.
    wasm: String,
    settings: Settings,
    policy: LoadedPolicy,
    vm: Option<Vm>,
    /// Log lines written while the VM started (policy loaded, warnings).
    pub start_logs: Vec<crate::host::LogLine>,
}

impl Runner {
    pub fn new(wasm: &Path, policy: LoadedPolicy, mut settings: Settings) -> Result<Runner> {
        let plugin = Plugin::load(wasm)?;
        for (k, v) in [
            ("CONSENTRY_HASH_KEY", REPLAY_HASH_KEY),
            ("CONSENTRY_SUBJECT_KEY", REPLAY_SUBJECT_KEY),
        ] {
            if !settings.env.iter().any(|(name, _)| name == k) {
                settings.env.push((k.to_string(), v.to_string()));
            }
        }
        settings.clusters.extend(policy.clusters());
        let vm = plugin.start(settings.clone(), &policy.json)?;
        let start_logs = vm.logs().to_vec();
        Ok(Runner {
            plugin,
            wasm: wasm.display().to_string(),
            settings,
            policy,
            vm: Some(vm),
            start_logs,
        })
    }

    pub fn policy(&self) -> &LoadedPolicy {
        &self.policy
    }

    /// Replays one recording.
    pub fn run(&mut self, rec: &Recording) -> Result<Replayed> {
        let vm = match self.vm.as_mut() {
            Some(vm) => vm,
            None => self.vm.insert(
                self.plugin
                    .start(self.settings.clone(), &self.policy.json)?,
            ),
        };
        let input = to_input(rec);
        let store_cluster = self.policy.store_cluster();
        let mut answer = |call: &HttpCall| -> Option<CallAnswer> {
            if Some(&call.cluster) != store_cluster.as_ref() {
                return None;
            }
            Some(answer_store(&rec.store, call))
        };
        let out = vm.run(&input, &mut answer);
        if out.trap.is_some() {
            // A trapped VM is gone, as in Envoy; the next exchange gets a new one.
            self.vm = None;
        }
        Replayed::new(rec, out, &self.wasm)
    }
}

fn to_input(rec: &Recording) -> ExchangeInput {
    let mut properties = BTreeMap::new();
    if let Some(c) = &rec.cluster {
        properties.insert("xds.cluster_name".into(), c.clone().into_bytes());
    }
    if let Some(p) = &rec.peer_principal {
        properties.insert(
            "connection.uri_san_peer_certificate".into(),
            p.clone().into_bytes(),
        );
    }
    let req = &rec.request;
    for (prop, header) in [
        ("request.path", ":path"),
        ("request.method", ":method"),
        ("request.host", ":authority"),
        ("request.scheme", ":scheme"),
        ("request.id", "x-request-id"),
    ] {
        if let Some(v) = req.header(header) {
            properties.insert(prop.into(), v.as_bytes().to_vec());
        }
    }
    if let Some(p) = req.header(":path") {
        let url_path = p.split('?').next().unwrap_or(p);
        properties.insert("request.url_path".into(), url_path.as_bytes().to_vec());
    }
    properties.insert(
        "request.size".into(),
        (req.body.len() as i64).to_le_bytes().to_vec(),
    );
    ExchangeInput {
        request_headers: req.headers.clone(),
        request_body: req.body.clone(),
        request_trailers: req.trailers.clone(),
        response: rec.response.as_ref().map(|r| Delivered {
            headers: r.headers.clone(),
            body: r.body.clone(),
            trailers: r.trailers.clone(),
        }),
        properties,
    }
}

/// The scripted consent store's answer to a lookup.
fn answer_store(behaviour: &StoreBehaviour, call: &HttpCall) -> CallAnswer {
    let ok = |body: Vec<u8>| CallAnswer::Response {
        headers: vec![
            (":status".into(), "200".into()),
            ("content-type".into(), "application/json".into()),
        ],
        body,
    };
    match behaviour {
        StoreBehaviour::Answer(data) => {
            let asked: Vec<String> = serde_json::from_slice::<Value>(&call.body)
                .ok()
                .and_then(|v| v.get("subjects").cloned())
                .and_then(|s| serde_json::from_value(s).ok())
                .unwrap_or_default();
            let consents: serde_json::Map<String, Value> = asked
                .iter()
                .filter_map(|s| data.get(s).map(|g| (s.clone(), serde_json::json!(g))))
                .collect();
            ok(serde_json::json!({ "consents": consents })
                .to_string()
                .into_bytes())
        }
        StoreBehaviour::Status(code) => CallAnswer::Response {
            headers: vec![(":status".into(), code.to_string())],
            body: Vec::new(),
        },
        StoreBehaviour::Garbage => ok(b"<html>service unavailable</html>".to_vec()),
        StoreBehaviour::Timeout | StoreBehaviour::Down => CallAnswer::Failure,
    }
}

/// One direction of a replayed exchange, as a reader wants it.
#[derive(Debug, Clone, Serialize)]
pub struct DirectionResult {
    /// forwarded, replied, refused_by_envoy, stalled, not_reached.
    pub fate: &'static str,
    /// Status of a local reply or of Envoy's own refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u32>,
    /// What the recipient received (for a response: what the client received).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered: Option<Delivered>,
    /// The decision log entry of this direction, if the policy touched it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Value>,
}

/// A replayed exchange with its verdict against the recording's expectations.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub request: DirectionResult,
    pub response: DirectionResult,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trap: Option<String>,
    pub warnings: Vec<String>,
    /// Differences from the expectations; empty when they hold (or there were none).
    pub mismatches: Vec<String>,
    pub expected: bool,
    #[serde(skip)]
    pub raw: ExchangeOutput,
}

/// The decision records the filter logged for one exchange. A record of another
/// version than this consentry reads (a `.wasm` older than decision record v2) is an
/// error naming the module and the log line, never read wrong.
fn decisions(out: &ExchangeOutput, wasm: &str) -> Result<Vec<Value>> {
    let mut found = Vec::new();
    for (i, l) in out.logs.iter().enumerate() {
        let Some(j) = l.message.strip_prefix(DECISION_PREFIX) else {
            continue;
        };
        let v: Value = serde_json::from_str(j).with_context(|| {
            format!(
                "the filter ({wasm}) logged a decision line that is not JSON (log line {} of the exchange)",
                i + 1
            )
        })?;
        if let Some(o) = v.as_object() {
            if !crate::record::is_supported(o) {
                anyhow::bail!(
                    "{}: rebuild the .wasm from this consentry's source",
                    crate::record::unsupported(
                        o,
                        &format!("line {} of the exchange's log from {wasm}", i + 1)
                    )
                );
            }
        }
        found.push(v);
    }
    Ok(found)
}

fn direction_result(fate: &Fate, decision: Option<Value>) -> DirectionResult {
    let (name, status, delivered) = match fate {
        Fate::Forwarded(d) => ("forwarded", None, Some(d.clone())),
        Fate::Replied(r) => ("replied", Some(r.status), None),
        Fate::EnvoyRefused { status, .. } => ("refused_by_envoy", Some(*status), None),
        Fate::Stalled { .. } => ("stalled", None, None),
        Fate::NotReached => ("not_reached", None, None),
    };
    DirectionResult {
        fate: name,
        status,
        delivered,
        decision,
    }
}

impl Replayed {
    fn new(rec: &Recording, out: ExchangeOutput, wasm: &str) -> Result<Replayed> {
        let logs = decisions(&out, wasm)?;
        let find = |dir: &str| {
            logs.iter()
                .find(|d| d.get("direction").and_then(Value::as_str) == Some(dir))
                .cloned()
        };
        let request = direction_result(&out.request, find("request"));
        let mut response = direction_result(&out.response, find("response"));
        // What the client got in the end, whichever way.
        if response.delivered.is_none() {
            response.delivered = out.client.clone();
        }
        let mut r = Replayed {
            source: rec.source.clone(),
            name: rec.name.clone(),
            request,
            response,
            trap: out.trap.clone(),
            warnings: rec.warnings.clone(),
            mismatches: Vec::new(),
            expected: rec.expect.is_some(),
            raw: out,
        };
        if let Some(trap) = &r.trap {
            r.mismatches.push(format!("the filter trapped: {trap}"));
        }
        for (dir, res) in [("request", &r.request), ("response", &r.response)] {
            if res.fate == "stalled" {
                r.mismatches.push(format!(
                    "the {dir} stalled: the filter paused and never resumed"
                ));
            }
        }
        if let Some(exp) = &rec.expect {
            let mut m = Vec::new();
            check_direction("request", &exp.request, &r.request, &mut m);
            check_direction("response", &exp.response, &r.response, &mut m);
            r.mismatches.extend(m);
        }
        Ok(r)
    }

    pub fn passed(&self) -> bool {
        self.mismatches.is_empty()
    }

    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("{n} ({})", self.source),
            None => self.source.clone(),
        }
    }
}

fn body_json(d: &Delivered) -> Option<Value> {
    if d.body.is_empty() {
        return None;
    }
    serde_json::from_slice(&d.body).ok()
}

fn check_direction(
    dir: &str,
    exp: &DirectionExpectation,
    got: &DirectionResult,
    m: &mut Vec<String>,
) {
    let delivered = got.fate == "forwarded";
    if let Some(want) = exp.delivered {
        if want != delivered {
            m.push(format!(
                "{dir}: expected it {}delivered, but it was {}",
                if want { "" } else { "not " },
                got.fate.replace('_', " ")
            ));
        }
    }
    if let Some(want) = exp.status {
        let status = got.status.or_else(|| {
            got.delivered
                .as_ref()
                .and_then(|d| d.headers.iter().find(|(k, _)| k == ":status"))
                .and_then(|(_, v)| v.parse().ok())
        });
        if status != Some(u32::from(want)) {
            m.push(format!(
                "{dir}: expected status {want}, got {}",
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "none".into())
            ));
        }
    }
    if let Some(want) = &exp.outcome {
        let outcome = got
            .decision
            .as_ref()
            .and_then(|d| d.get("outcome"))
            .and_then(Value::as_str)
            .unwrap_or("none (not logged)");
        if outcome != want {
            m.push(format!("{dir}: expected outcome {want}, got {outcome}"));
        }
    }
    if let Some(want) = &exp.body {
        match got.delivered.as_ref() {
            None => m.push(format!("{dir}: expected a body, but nothing was delivered")),
            Some(d) => match body_json(d) {
                Some(v) if &v == want => {}
                Some(v) => m.push(format!("{dir}: body differs:\n{}", json_diff(want, &v))),
                None => m.push(format!(
                    "{dir}: expected a JSON body, got {:?}",
                    String::from_utf8_lossy(&d.body)
                        .chars()
                        .take(200)
                        .collect::<String>()
                )),
            },
        }
    }
    for (name, want) in &exp.headers {
        let got_v = got
            .delivered
            .as_ref()
            .and_then(|d| d.headers.iter().find(|(k, _)| k == name))
            .map(|(_, v)| v.clone());
        if &got_v != want {
            m.push(format!(
                "{dir}: header {name}: expected {}, got {}",
                want.as_deref()
                    .map(|v| format!("{v:?}"))
                    .unwrap_or_else(|| "absent".into()),
                got_v
                    .map(|v| format!("{v:?}"))
                    .unwrap_or_else(|| "absent".into())
            ));
        }
    }
}

/// A readable structural diff of two JSON values: one line per differing path.
pub fn json_diff(want: &Value, got: &Value) -> String {
    let mut lines = Vec::new();
    diff_at("$", want, got, &mut lines);
    lines.join("\n")
}

fn diff_at(path: &str, want: &Value, got: &Value, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(vb) => diff_at(&p, va, vb, out),
                    None => out.push(format!("  - {p}: expected {va}, missing")),
                }
            }
            for (k, vb) in b {
                if !a.contains_key(k) {
                    out.push(format!("  + {path}.{k}: unexpected {vb}"));
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, va) in a.iter().enumerate() {
                let p = format!("{path}[{i}]");
                match b.get(i) {
                    Some(vb) => diff_at(&p, va, vb, out),
                    None => out.push(format!("  - {p}: expected {va}, missing")),
                }
            }
            for (i, vb) in b.iter().enumerate().skip(a.len()) {
                out.push(format!("  + {path}[{i}]: unexpected {vb}"));
            }
        }
        (a, b) if a != b => out.push(format!("  ~ {path}: expected {a}, got {b}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::LogLine;

    fn output(lines: &[&str]) -> ExchangeOutput {
        ExchangeOutput {
            request: Fate::NotReached,
            response: Fate::NotReached,
            client: None,
            logs: lines
                .iter()
                .map(|m| LogLine {
                    level: "info",
                    message: m.to_string(),
                })
                .collect(),
            filter_state: BTreeMap::new(),
            http_calls: Vec::new(),
            trace: Vec::new(),
            trap: None,
        }
    }

    #[test]
    fn a_v1_record_from_an_old_wasm_is_an_error_naming_it() {
        let v2 = format!(
            r#"{DECISION_PREFIX}{{"v":2,"outcome":"allowed","decisions":[],"counts":{{}}}}"#
        );
        let v1 = format!(r#"{DECISION_PREFIX}{{"outcome":"allowed","fields":[],"counts":{{}}}}"#);
        let ok = decisions(&output(&["policy loaded", &v2]), "f.wasm").unwrap();
        assert_eq!(ok.len(), 1);
        let err = decisions(&output(&["policy loaded", &v2, &v1]), "old.wasm")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("unsupported decision-record version (v1 line 3 of the exchange's log from old.wasm; this consentry reads v2)"),
            "{err}"
        );
    }
}
