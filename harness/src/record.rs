//! Reading decision records, format v2 (`"v": 2`), as the filter writes them
//! (`plugin/src/engine/decision.rs`; JSON Schema
//! `policies/consentry-decision-record.v2.schema.json`).
//!
//! A record lists the message's subjects once (`subjects`: keyed pseudonyms) and its
//! field decisions in groups (`decisions`): each with its category, action, reason,
//! purpose, basis and evidence, the path templates it covers (`$.customers[*].email`),
//! how many decisions it stands for (`n`) and their subjects as index ranges into
//! `subjects` (`"0-3,5"`). Every reader here refuses other versions with
//! [`unsupported`], never reading them wrong.

use consentry::engine::{parse_subject_ranges, RECORD_VERSION};
use serde_json::{Map, Value};

/// The record version of an entry: its `v`, or 1 for an entry without one (v1 records
/// carried no version and listed `fields`).
pub fn version(entry: &Map<String, Value>) -> u64 {
    match entry.get("v") {
        None => 1,
        Some(v) => v.as_u64().unwrap_or(0),
    }
}

/// Whether an entry is of the version this consentry reads.
pub fn is_supported(entry: &Map<String, Value>) -> bool {
    version(entry) == u64::from(RECORD_VERSION)
}

/// The error for an entry of another version; `place` says where it is (`line 12 of
/// envoy.log`, `entry 3 of replay.json`).
pub fn unsupported(entry: &Map<String, Value>, place: &str) -> String {
    let v = match entry.get("v") {
        None => "v1".to_string(),
        Some(Value::Number(n)) => format!("v{n}"),
        Some(other) => format!("v{other}"),
    };
    let hint = if v == "v1" {
        "; v1 records (a `fields` list, no `\"v\"`) come from a consentry filter older than decision record v2: read them with the consentry release that wrote them"
    } else {
        ""
    };
    format!(
        "unsupported decision-record version ({v} {place}; this consentry reads v{RECORD_VERSION}){hint}"
    )
}

/// A count written as a number (or, leniently, as text).
pub fn count_of(v: &Value) -> Option<usize> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| usize::try_from(n).ok()),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// How many field decisions a group stands for: its `n`, at least 1.
pub fn group_n(group: &Map<String, Value>) -> usize {
    group.get("n").and_then(count_of).unwrap_or(1).max(1)
}

/// The pseudonyms of a group's subjects, resolved through the entry's `subjects` list;
/// indexes that do not resolve are left out.
pub fn group_subjects<'e>(
    entry: &'e Map<String, Value>,
    group: &Map<String, Value>,
) -> Vec<&'e str> {
    let Some(list) = entry.get("subjects").and_then(Value::as_array) else {
        return Vec::new();
    };
    let indexes = match group.get("subjects") {
        Some(Value::String(s)) => parse_subject_ranges(s).unwrap_or_default(),
        Some(Value::Number(n)) => n.as_u64().map(|i| vec![i as usize]).unwrap_or_default(),
        _ => Vec::new(),
    };
    indexes
        .into_iter()
        .filter_map(|i| list.get(i).and_then(Value::as_str))
        .collect()
}

/// The path templates of a group.
pub fn group_paths(group: &Map<String, Value>) -> Vec<&str> {
    group
        .get("paths")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The groups of an entry that are JSON objects.
pub fn groups(entry: &Map<String, Value>) -> impl Iterator<Item = &Map<String, Value>> {
    entry
        .get("decisions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
}

/// One field decision of a record as far as a group says it: a path template, the
/// group's category and action, and one of its subjects (`None`: the group has none).
/// A group with several paths and subjects stands for each pairing of them (the record
/// does not say which path each subject's decision was at).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Decision {
    pub path: String,
    pub category: String,
    pub action: String,
    pub subject: Option<String>,
}

/// The decisions of a v2 entry, one per (path template, subject) of each group.
pub fn decisions(entry: &Map<String, Value>) -> Vec<Decision> {
    let mut out = Vec::new();
    for g in groups(entry) {
        let s = |k: &str| g.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let subjects = group_subjects(entry, g);
        let subjects: Vec<Option<String>> = if subjects.is_empty() {
            vec![None]
        } else {
            subjects.into_iter().map(|x| Some(x.to_string())).collect()
        };
        for p in group_paths(g) {
            for subj in &subjects {
                out.push(Decision {
                    path: p.to_string(),
                    category: s("category"),
                    action: s("action"),
                    subject: subj.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn versions_and_groups_are_read() {
        let e = json!({
            "v": 2, "outcome": "modified", "subjects": ["s2:a", "s2:b", "s2:c"],
            "decisions": [
                {"category": "email", "action": "strip", "paths": ["$.c[*].email"], "n": 3, "subjects": "0-2"},
                {"category": "iban", "action": "block", "paths": ["$.c[*].iban", "header:x-iban"], "n": 2, "subjects": "1"},
                {"category": "x", "action": "allow", "paths": ["query:x"], "n": 1}
            ]
        });
        let e = e.as_object().unwrap();
        assert!(is_supported(e));
        let gs: Vec<_> = groups(e).collect();
        assert_eq!(group_subjects(e, gs[0]), ["s2:a", "s2:b", "s2:c"]);
        assert_eq!(group_n(gs[1]), 2);
        let d = decisions(e);
        assert_eq!(d.len(), 3 + 2 + 1);
        assert_eq!(d[3].subject.as_deref(), Some("s2:b"));
        assert_eq!(d[5].subject, None);
        let v1 = json!({"outcome": "allowed", "fields": []});
        let msg = unsupported(v1.as_object().unwrap(), "line 3 of envoy.log");
        assert!(
            msg.starts_with("unsupported decision-record version (v1 line 3 of envoy.log; this consentry reads v2)"),
            "{msg}"
        );
        let v3 = json!({"v": 3});
        assert!(!is_supported(v3.as_object().unwrap()));
        assert!(unsupported(v3.as_object().unwrap(), "line 1 of x").contains("(v3 line 1 of x;"));
    }
}
