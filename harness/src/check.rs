//! `consentry check POLICY`: validates a policy without running anything. Every error
//! the filter would refuse the policy for, with file, line and column, plus warnings
//! for policies that load but probably do not say what their author meant.

use consentry::engine::policy::{LegalBasis, PolicyFile, ShapeMismatch};
use consentry::engine::route;
use consentry::engine::{category_covers, read_policy, Policy};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Error,
    Warning,
}

/// One problem in a policy file.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// JSON Pointer into the policy (`/purposes/marketing.email/basis`).
    pub pointer: String,
    pub message: String,
}

impl Finding {
    pub fn location(&self) -> String {
        match (self.line, self.column) {
            (Some(l), Some(c)) => format!("{}:{l}:{c}", self.file),
            (Some(l), None) => format!("{}:{l}", self.file),
            _ => self.file.clone(),
        }
    }
}

/// A key that is always long enough: `check` judges the policy, not the deployment's
/// environment.
fn any_key(_: &str) -> Option<String> {
    Some("x".repeat(32))
}

/// Checks a policy file (JSON or YAML). `Err` only when the file cannot be read.
pub fn check_file(path: &Path) -> anyhow::Result<Vec<Finding>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    Ok(check_text(&path.display().to_string(), &text))
}

pub fn check_text(file: &str, text: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    let (value, positions) = match crate::yamlpos::parse(text) {
        Ok(v) => v,
        Err(e) => {
            out.push(Finding {
                severity: Severity::Error,
                file: file.to_string(),
                line: Some(e.line),
                column: Some(e.column),
                pointer: String::new(),
                message: if e.message.contains("anchor or alias") {
                    format!("{} (in YAML, `*` and `&` start aliases and anchors: quote JSONPaths, e.g. path: \"$.customers[*]\")", e.message)
                } else {
                    format!("{} (the policy is not valid YAML or JSON)", e.message)
                },
            });
            return out;
        }
    };
    let at = |pointer: &str| positions.nearest(pointer);
    let finding = |severity: Severity, pointer: String, message: String| {
        let (line, column) = match at(&pointer) {
            Some(pos) => (Some(pos.line), Some(pos.column)),
            None => (None, None),
        };
        Finding {
            severity,
            file: file.to_string(),
            line,
            column,
            pointer,
            message,
        }
    };
    // The filter's own reader: every shape error at once, each at its value.
    let policy_file = match read_policy(&value) {
        Ok(p) => p,
        Err(errors) => {
            for e in errors {
                out.push(finding(
                    Severity::Error,
                    e.pointer,
                    format!("{} (see policies/README.md for every key)", e.message),
                ));
            }
            return out;
        }
    };
    if let Err(errors) = Policy::from_file(&policy_file, &any_key) {
        for e in errors.0 {
            out.push(finding(Severity::Error, e.pointer, e.message));
        }
    }
    for (pointer, message) in lint(&policy_file, &value) {
        out.push(finding(Severity::Warning, pointer, message));
    }
    out
}

fn tok(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// What loads but is probably a mistake.
fn lint(p: &PolicyFile, raw: &Value) -> Vec<(String, String)> {
    let mut w = Vec::new();
    // Categories the bindings declare, and those the purposes allow.
    let mut declared: BTreeSet<&str> = BTreeSet::new();
    for m in &p.messages {
        for f in &m.fields {
            declared.insert(&f.category);
        }
        for n in m.headers.iter().chain(&m.query) {
            declared.insert(&n.category);
        }
    }
    for (name, purpose) in &p.purposes {
        for (i, allowed) in purpose.allows.iter().enumerate() {
            if !declared
                .iter()
                .any(|d| category_covers(allowed, d) || category_covers(d, allowed))
            {
                w.push((
                    format!("/purposes/{}/allows/{i}", tok(name)),
                    format!("`{allowed}` matches no category any binding declares, so it allows nothing; is it misspelt? Declared: {}", declared.iter().copied().collect::<Vec<_>>().join(", ")),
                ));
            }
        }
        if !p.services.values().any(|s| s.purposes.contains(name)) {
            w.push((
                format!("/purposes/{}", tok(name)),
                format!("no service declares purpose `{name}`; it lets nothing through"),
            ));
        }
    }
    for (bi, m) in p.messages.iter().enumerate() {
        for (fi, f) in m.fields.iter().enumerate() {
            let allowed_somewhere = p
                .purposes
                .values()
                .any(|pp| pp.allows.iter().any(|a| category_covers(a, &f.category)));
            if !allowed_somewhere {
                w.push((
                    format!("/messages/{bi}/fields/{fi}/category"),
                    format!(
                        "no purpose allows `{}`: every recipient will lose this field",
                        f.category
                    ),
                ));
            }
            if !f.category.starts_with("user.")
                && !f.category.starts_with("system.")
                && f.category != "user"
            {
                w.push((
                    format!("/messages/{bi}/fields/{fi}/category"),
                    format!("`{}` is outside the Fides data-category namespaces (user.*, system.*); use the taxonomy's names so reviewers recognise it", f.category),
                ));
            }
            // Field paths are relative to the record: repeating the records path is
            // the commonest slip, and such a selector never matches.
            let rec = m.records.trim_end_matches("[*]");
            if m.records != "$" && rec.len() > 1 && f.path.starts_with(rec) {
                w.push((
                    format!("/messages/{bi}/fields/{fi}/path"),
                    format!("`{}` starts with the records path `{}`, but field paths are relative to each record (write `$.{}`); as written it can never match", f.path, m.records, f.path.rsplit('.').next().unwrap_or("field")),
                ));
            }
        }
        let has_consent_purpose = p
            .purposes
            .values()
            .any(|pp| pp.basis == LegalBasis::Consent);
        if m.shape_mismatch == ShapeMismatch::Pass {
            w.push((
                format!("/messages/{bi}/shape_mismatch"),
                format!("binding `{}` passes bodies in which `{}` finds no records: such a body (a renamed envelope, a bare record) reaches its recipient unjudged, logged only as uninspectable; prefer a binding for each shape", m.name, m.records),
            ));
        }
        if has_consent_purpose
            && m.consent.is_none()
            && p.consent.header.is_none()
            && p.consent.store.is_none()
        {
            w.push((
                format!("/messages/{bi}"),
                format!("binding `{}` has no consent source (no `consent` path, and the policy has no consent header or store): consent-based purposes will never hold for its records", m.name),
            ));
        }
        // A binding an earlier one always wins over is never used.
        for (ei, earlier) in p.messages.iter().enumerate().take(bi) {
            let dirs_overlap = earlier.direction == m.direction
                || earlier.direction == consentry::engine::policy::DirectionSpec::Both;
            // Compared as the filter compares them: canonical, in any case.
            let canon = |p: &String| route::canonical_path(p).unwrap_or_else(|_| p.clone());
            let paths_covered = earlier.paths.is_empty()
                || (!m.paths.is_empty()
                    && m.paths.iter().all(|p2| {
                        earlier
                            .paths
                            .iter()
                            .any(|p1| route::has_prefix(&canon(p2), &canon(p1), false))
                    }));
            let methods_covered = earlier.methods.is_empty()
                || (!m.methods.is_empty()
                    && m.methods
                        .iter()
                        .all(|x| earlier.methods.iter().any(|y| x.eq_ignore_ascii_case(y))));
            if dirs_overlap && paths_covered && methods_covered {
                w.push((
                    format!("/messages/{bi}"),
                    format!("binding `{}` is shadowed by /messages/{ei} (`{}`), which covers all its paths, methods and directions first; it is never used", m.name, earlier.name),
                ));
                break;
            }
        }
    }
    if let Some(h) = &p.identity.caller_header {
        if h.trust_plaintext {
            w.push((
                "/identity/caller_header/trust_plaintext".into(),
                format!("`{}` is trusted on requests without an mTLS principal: anything that can reach this Envoy can name itself any service and receive what that service may; use this only without a mesh, behind a network that strips the header, and prefer `trusted_from` with the gateway's principal", h.name),
            ));
        }
    }
    for (name, s) in &p.services {
        if s.purposes.is_empty() {
            w.push((
                format!("/services/{}", tok(name)),
                format!("service `{name}` has no purposes: it receives no declared customer data (if that is the intent, say so in a comment)"),
            ));
        }
        if s.clusters.is_empty()
            && s.authorities.is_empty()
            && s.principals.is_empty()
            && raw.pointer("/identity/caller_header").is_none()
        {
            w.push((
                format!("/services/{}", tok(name)),
                format!("service `{name}` has no cluster, authority or principal and the policy trusts no caller header: nothing can be recognised as it"),
            ));
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../policies/acme-customers.json");

    #[test]
    fn the_example_policy_has_no_errors() {
        let f = check_text("acme.json", EXAMPLE);
        assert!(f.iter().all(|x| x.severity == Severity::Warning), "{f:#?}");
    }

    #[test]
    fn errors_carry_line_and_column_of_the_offending_value() {
        let text = "consentry: 1\nname: t\nservices:\n  a:\n    purposes: [p.one]\npurposes:\n  p.one:\n    basis: consent\n    allows: [user.name]\nmessages:\n  - name: m\n    fields:\n      - { path: \"$.n\", category: user.name }\n";
        let f = check_text("t.yaml", text);
        let e = f
            .iter()
            .find(|x| x.severity == Severity::Error)
            .expect("an error");
        assert_eq!(e.pointer, "/purposes/p.one/basis");
        assert_eq!(e.line, Some(8), "{e:?}");
        assert!(e.message.contains("consent_key"));
    }

    #[test]
    fn unknown_keys_are_located() {
        let text = "consentry: 1\nname: t\nservces: {}\n";
        let f = check_text("t.yaml", text);
        assert!(f[0].message.contains("unknown field `servces`"), "{f:#?}");
        assert!(
            f[0].message.contains("(did you mean `services`?)"),
            "{f:#?}"
        );
        assert_eq!(f[0].line, Some(3), "{f:#?}");
        // The keys that are missing because of it, and the others, in the same run.
        let missing: Vec<&str> = f[1..].iter().map(|x| x.message.as_str()).collect();
        assert_eq!(missing.len(), 3, "{f:#?}");
        for key in ["services", "purposes", "messages"] {
            assert!(
                missing
                    .iter()
                    .any(|m| m.starts_with(&format!("missing field `{key}`"))),
                "{f:#?}"
            );
        }
    }

    #[test]
    fn every_shape_error_is_reported_at_once_at_its_line() {
        let text = "consentry: 1\nname: t\nmode: enforcing\nservices:\n  a:\n    purposes: [p.one]\n    clusterz: [a]\npurposes:\n  p.one:\n    basis: contract\n    allows: [user.name]\nmessages:\n  - name: m\n    fields:\n      - { path: \"$.n\", category: user.name, action: scramble }\n";
        let f = check_text("t.yaml", text);
        let got: Vec<(&str, Option<usize>)> =
            f.iter().map(|x| (x.pointer.as_str(), x.line)).collect();
        assert_eq!(
            got,
            [
                ("/mode", Some(3)),
                ("/services/a/clusterz", Some(7)),
                ("/messages/0/fields/0/action", Some(15)),
            ],
            "{f:#?}"
        );
        assert!(f.iter().all(|x| x.severity == Severity::Error));
        assert!(f[1].message.contains("did you mean `clusters`?"), "{f:#?}");
    }

    #[test]
    fn trusting_a_plaintext_caller_header_and_passing_other_shapes_are_warned_about() {
        let mut v: Value = serde_json::from_str(EXAMPLE).unwrap();
        assert!(check_text("x.json", EXAMPLE).iter().all(
            |x| !x.pointer.starts_with("/identity") && !x.pointer.ends_with("/shape_mismatch")
        ));
        v["identity"]["caller_header"]["trust_plaintext"] = Value::Bool(true);
        v["messages"][0]["shape_mismatch"] = Value::from("pass");
        let f = check_text("x.json", &serde_json::to_string_pretty(&v).unwrap());
        assert!(f.iter().all(|x| x.severity == Severity::Warning), "{f:#?}");
        let plain = f
            .iter()
            .find(|x| x.pointer == "/identity/caller_header/trust_plaintext")
            .expect("a warning about trust_plaintext");
        assert!(plain.message.contains("without an mTLS principal") && plain.line.is_some());
        assert!(
            f.iter().any(|x| x.pointer == "/messages/0/shape_mismatch"),
            "{f:#?}"
        );
    }

    #[test]
    fn a_shadowed_binding_is_found_through_other_spellings_of_its_paths() {
        let mut v: Value = serde_json::from_str(EXAMPLE).unwrap();
        let mut second = v["messages"][0].clone();
        second["name"] = Value::from("later");
        second["paths"] = serde_json::json!(["/V1//Customers/42"]);
        v["messages"].as_array_mut().unwrap().push(second);
        let f = check_text("x.json", &serde_json::to_string_pretty(&v).unwrap());
        assert!(
            f.iter().any(
                |x| x.pointer == "/messages/2" && x.message.contains("shadowed by /messages/0")
            ),
            "{f:#?}"
        );
    }

    #[test]
    fn misspelt_categories_and_relative_paths_are_warned_about() {
        let mut v: Value = serde_json::from_str(EXAMPLE).unwrap();
        v["purposes"]["marketing.email"]["allows"][0] = Value::from("user.nmae");
        v["messages"][0]["fields"][2]["path"] = Value::from("$.customers[*].email");
        let text = serde_json::to_string_pretty(&v).unwrap();
        let f = check_text("x.json", &text);
        assert!(
            f.iter()
                .any(|x| x.pointer == "/purposes/marketing.email/allows/0"
                    && x.message.contains("misspelt")),
            "{f:#?}"
        );
        assert!(f.iter().any(|x| x.pointer == "/messages/0/fields/2/path" && x.message.contains("relative")), "{f:#?}");
        assert!(f.iter().all(|x| x.line.is_some()));
    }
}
