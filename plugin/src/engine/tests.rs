//! Engine tests for every rule of docs/DESIGN.md, on small policies written for each rule.

use super::*;
use serde_json::{json, Value};

const HASH_KEY: &str = "test-hash-key-0123456789";
const SUBJECT_KEY: &str = "test-subject-key-0123456789";

pub(super) fn env(name: &str) -> Option<String> {
    match name {
        "CONSENTRY_HASH_KEY" => Some(HASH_KEY.into()),
        "CONSENTRY_SUBJECT_KEY" => Some(SUBJECT_KEY.into()),
        _ => None,
    }
}

/// A policy with one service per legal basis and a customer batch binding; `patch`
/// overrides top-level keys.
pub(super) fn policy_json(patch: Value) -> Value {
    let mut p = json!({
        "consentry": 1,
        "name": "test-policy",
        // Plaintext callers name themselves here, so that each rule's test can pick
        // its caller in one line; the identity rules have their own tests below.
        "identity": { "caller_header": { "name": "x-caller", "trusted_from": ["gateway"], "trust_plaintext": true } },
        "services": {
            "crm":       { "clusters": ["crm"], "principals": ["spiffe://t/crm"], "purposes": ["essential.account"] },
            "mailer":    { "clusters": ["mailer"], "authorities": ["mailer.internal"], "principals": ["spiffe://t/mailer"], "purposes": ["marketing.email"] },
            "stats":     { "clusters": ["stats"], "purposes": ["analytics.reporting"] },
            "tax":       { "clusters": ["tax"], "purposes": ["legal.tax"] },
            "er":        { "clusters": ["er"], "purposes": ["health.emergency"] },
            "registry":  { "clusters": ["registry"], "purposes": ["public.census"] },
            "gateway":   { "principals": ["spiffe://t/gateway"], "purposes": ["essential.account"] },
            "nothing":   { "clusters": ["nothing"] },
            "both":      { "clusters": ["both"], "purposes": ["marketing.email", "analytics.reporting"] }
        },
        "purposes": {
            "essential.account":   { "basis": "contract", "allows": ["user"] },
            "marketing.email":     { "basis": "consent", "consent_key": "email_ok", "allows": ["user.contact.email", "user.name"] },
            "analytics.reporting": { "basis": "legitimate_interests", "allows": ["user.demographic", "user.name"] },
            "legal.tax":           { "basis": "legal_obligation", "allows": ["user.government_id"] },
            "health.emergency":    { "basis": "vital_interests", "allows": ["user.health"] },
            "public.census":       { "basis": "public_task", "allows": ["user.demographic"] }
        },
        "consent": { "header": { "name": "x-consent", "trusted_callers": ["gateway"] },
                     "store": { "cluster": "consent" } },
        "messages": [{
            "name": "batch",
            "paths": ["/v1/customers"],
            "records": "$.customers[*]",
            "subject": "$.id",
            "consent": "$.consents",
            "fields": [
                { "path": "$.email", "category": "user.contact.email" },
                { "path": "$.name", "category": "user.name", "action": "redact" },
                { "path": "$.ssn", "category": "user.government_id", "action": "hash" },
                { "path": "$.phone", "category": "user.contact.phone_number", "action": { "mask": { "keep_last": 2 } } },
                { "path": "$.health", "category": "user.health", "action": "block" },
                { "path": "$.age", "category": "user.demographic.age" }
            ],
            "message_subject": { "header": "x-customer" },
            "headers": [ { "name": "X-Email", "category": "user.contact.email" } ],
            "query": [ { "name": "email", "category": "user.contact.email", "action": "redact" } ]
        }]
    });
    if let (Value::Object(base), Value::Object(over)) = (&mut p, patch) {
        for (k, v) in over {
            base.insert(k, v);
        }
    }
    p
}

pub(super) fn compile(v: &Value) -> Policy {
    Policy::compile(v.to_string().as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"))
}

pub(super) fn policy() -> Policy {
    compile(&policy_json(json!({})))
}

/// An exchange from `caller` (via the trusted caller header) to the service behind
/// `cluster`.
pub(super) fn exchange(
    p: &Policy,
    caller: &str,
    cluster: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Exchange {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    p.exchange(
        Some("req-1".into()),
        "POST",
        path,
        p.identify_caller(None, Some(caller)),
        p.identify_upstream(Some(cluster), None),
        &headers,
    )
}

pub(super) struct Run {
    pub out: Value,
    pub report: Report,
    pub log: DecisionLog,
    pub store_subjects: Vec<String>,
}

pub(super) fn run_with(
    p: &Policy,
    ex: &Exchange,
    d: Direction,
    body: &Value,
    store: &StoreAnswers,
) -> Run {
    let bytes = body.to_string();
    let plan = p
        .plan_body(ex, d, Some("application/json"), None, bytes.as_bytes())
        .expect("inspectable");
    let store_subjects = plan.store_subjects.clone();
    let v = p.judge_body(ex, d, plan, store);
    let out = match &v.body {
        Some(b) => serde_json::from_slice(b).expect("valid JSON out"),
        None => body.clone(),
    };
    let log = p.decision_log(ex, d, &v.report, None, 0);
    check_record(&log);
    Run {
        out,
        report: v.report,
        log,
        store_subjects,
    }
}

/// The pseudonym a record names raw subject `subject` by, under the tests' subject key.
pub(super) fn pseudonym(subject: &str) -> String {
    subject_pseudonym(SUBJECT_KEY.as_bytes(), subject)
}

/// The shape every record must have: each group has paths (or folds them), counts what
/// it stands for, and names subjects the record lists; the counts are the groups' sums;
/// subjects are distinct pseudonyms, each used by some group.
pub(super) fn check_record(log: &DecisionLog) {
    assert_eq!(log.v, 2);
    let mut sums: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut used = vec![false; log.subjects.len()];
    for g in &log.decisions {
        assert!(g.n > 0, "{g:?}");
        assert!(!g.paths.is_empty() || g.folded > 0, "{g:?}");
        assert!(g.folded <= g.n, "{g:?}");
        let distinct: std::collections::BTreeSet<&String> = g.paths.iter().collect();
        assert_eq!(distinct.len(), g.paths.len(), "paths listed once: {g:?}");
        assert!(g.subjects.windows(2).all(|w| w[0] < w[1]), "{g:?}");
        assert!(g.subjects.len() <= g.n, "{g:?}");
        for &i in &g.subjects {
            used[i] = true;
        }
        for p in &g.paths {
            let indexed = p
                .match_indices('[')
                .any(|(i, _)| p[i + 1..].starts_with(|c: char| c.is_ascii_digit()));
            assert!(!indexed, "path templates hold no index: {g:?}");
        }
        *sums.entry(g.action).or_default() += g.n;
    }
    let counts: std::collections::BTreeMap<&str, usize> =
        log.counts.iter().map(|(k, v)| (*k, *v)).collect();
    assert_eq!(sums, counts, "counts are the groups' sums");
    assert!(used.iter().all(|u| *u), "every subject is some group's");
    let distinct: std::collections::BTreeSet<&String> = log.subjects.iter().collect();
    assert_eq!(distinct.len(), log.subjects.len());
    assert!(log
        .subjects
        .iter()
        .all(|s| s.starts_with("s2:") && s.len() == 19));
    let v: Value = serde_json::from_str(&log.to_json()).unwrap();
    assert_eq!(v["v"], 2);
    assert!(v.get("fields").is_none() && v.get("fields_omitted").is_none());
}

/// The groups of `log` that list `path` (a template).
pub(super) fn groups_at<'l>(log: &'l DecisionLog, path: &str) -> Vec<&'l DecisionGroup> {
    log.decisions
        .iter()
        .filter(|g| g.paths.iter().any(|p| p == path))
        .collect()
}

/// The one group holding the decision at `path` (a template) about raw subject
/// `subject`.
pub(super) fn decision_for<'l>(
    log: &'l DecisionLog,
    path: &str,
    subject: &str,
) -> &'l DecisionGroup {
    let s = pseudonym(subject);
    let i = log
        .subjects
        .iter()
        .position(|x| *x == s)
        .unwrap_or_else(|| panic!("{subject} is not a subject of {}", log.to_json()));
    let found: Vec<_> = groups_at(log, path)
        .into_iter()
        .filter(|g| g.subjects.contains(&i))
        .collect();
    assert_eq!(found.len(), 1, "{path} of {subject}: {}", log.to_json());
    found[0]
}

/// Field decisions of the groups that satisfy `f`.
pub(super) fn count_where(log: &DecisionLog, f: impl Fn(&DecisionGroup) -> bool) -> usize {
    log.decisions.iter().filter(|g| f(g)).map(|g| g.n).sum()
}

fn run(p: &Policy, to: &str, body: &Value) -> Run {
    let ex = exchange(p, "crm", to, "/v1/customers", &[]);
    run_with(p, &ex, Direction::Request, body, &StoreAnswers::new())
}

pub(super) fn batch(records: Value) -> Value {
    json!({ "customers": records, "page": 1 })
}

#[test]
fn consent_is_applied_per_record() {
    let p = policy();
    let body = batch(json!([
        { "id": "c-1", "email": "ann@example.com", "name": "Ann", "consents": { "email_ok": true } },
        { "id": "c-2", "email": "bob@example.com", "name": "Bob", "consents": { "email_ok": false } },
        { "id": "c-3", "email": "cat@example.com", "name": "Cat" }
    ]));
    let r = run(&p, "mailer", &body);
    let c = &r.out["customers"];
    assert_eq!(c[0]["email"], "ann@example.com");
    assert_eq!(c[0]["name"], "Ann");
    assert!(
        c[1].get("email").is_none(),
        "no consent: default action strips"
    );
    assert_eq!(c[1]["name"], "[redacted]");
    assert!(
        c[2].get("email").is_none(),
        "no consent found means no consent given"
    );
    assert_eq!(r.out["page"], 1, "data outside records is left alone");
    let ann = decision_for(&r.log, "$.customers[*].email", "c-1");
    assert_eq!(ann.action, "allow");
    assert_eq!(ann.basis, Some("consent"));
    assert_eq!(ann.evidence.as_deref(), Some("record:$.consents.email_ok"));
    assert_eq!((ann.n, &ann.subjects), (1, &vec![0]));
    let bob = decision_for(&r.log, "$.customers[*].email", "c-2");
    assert_eq!((bob.action, bob.reason), ("strip", Some(Reason::NoConsent)));
    assert_eq!(bob.purpose.as_deref(), Some("marketing.email"));
    assert_eq!(bob.evidence.as_deref(), Some("record:$.consents.email_ok"));
    assert_eq!((bob.n, &bob.subjects), (1, &vec![1]));
    // c-3 has no consents object: no consent found, from the store either.
    let cat = decision_for(&r.log, "$.customers[*].email", "c-3");
    assert_eq!(
        (cat.action, cat.evidence.as_deref()),
        ("strip", Some("none"))
    );
    assert_eq!(r.log.subjects, ["c-1", "c-2", "c-3"].map(pseudonym));
    assert_eq!(r.log.records, 3);
    assert_eq!(r.log.outcome, Outcome::Modified);
}

#[test]
fn a_parent_category_covers_its_children() {
    let p = policy();
    // crm's purpose allows `user`, which covers user.contact.email and user.health.
    let body = batch(json!([{ "id": "c-1", "email": "a@b.c", "phone": "123456", "age": 40 }]));
    let r = run(&p, "crm", &body);
    assert_eq!(r.out, body);
    assert_eq!(r.log.outcome, Outcome::Allowed);
    assert!(!r.log.decisions.is_empty());
    assert!(r
        .log
        .decisions
        .iter()
        .all(|g| g.action == "allow" && g.basis == Some("contract")));
    // stats allows user.demographic: its child user.demographic.age passes.
    let r = run(&p, "stats", &body);
    assert_eq!(r.out["customers"][0]["age"], 40);
}

#[test]
fn every_non_consent_basis_holds_by_declaration_and_is_recorded() {
    let p = policy();
    let cases = [
        ("crm", "email", json!("a@b.c"), "contract"),
        ("tax", "ssn", json!("123-45-6789"), "legal_obligation"),
        ("er", "health", json!("asthma"), "vital_interests"),
        ("registry", "age", json!(33), "public_task"),
        ("stats", "age", json!(33), "legitimate_interests"),
    ];
    for (service, field, value, basis) in cases {
        let mut rec = json!({ "id": "c-9" });
        rec[field] = value.clone();
        let r = run(&p, service, &batch(json!([rec])));
        assert_eq!(
            r.out["customers"][0][field], value,
            "{service} keeps {field}"
        );
        let d = decision_for(&r.log, &format!("$.customers[*].{field}"), "c-9");
        assert_eq!((d.action, d.basis), ("allow", Some(basis)), "{service}");
        assert!(d.evidence.is_none(), "no consent evidence for {basis}");
    }
}

#[test]
fn the_consent_basis_needs_the_grant() {
    let p = policy();
    let granted =
        batch(json!([{ "id": "c-1", "email": "a@b.c", "consents": { "email_ok": true } }]));
    assert_eq!(run(&p, "mailer", &granted).out, granted);
    let absent = batch(json!([{ "id": "c-1", "email": "a@b.c", "consents": {} }]));
    assert!(run(&p, "mailer", &absent).out["customers"][0]
        .get("email")
        .is_none());
    // `{"granted": true}` is accepted as well; anything else is not a grant.
    let object = batch(
        json!([{ "id": "c-1", "email": "a@b.c", "consents": { "email_ok": { "granted": true } } }]),
    );
    assert_eq!(run(&p, "mailer", &object).out, object);
    let string =
        batch(json!([{ "id": "c-1", "email": "a@b.c", "consents": { "email_ok": "yes" } }]));
    assert!(run(&p, "mailer", &string).out["customers"][0]
        .get("email")
        .is_none());
}

#[test]
fn purposes_are_tried_in_the_services_order() {
    let p = policy();
    // `both` lists marketing.email (consent) before analytics.reporting (legitimate
    // interests); both allow user.name. Without consent the second one holds.
    let body = batch(json!([{ "id": "c-1", "name": "Ann" }]));
    let r = run(&p, "both", &body);
    assert_eq!(r.out["customers"][0]["name"], "Ann");
    let d = decision_for(&r.log, "$.customers[*].name", "c-1");
    assert_eq!(d.purpose.as_deref(), Some("analytics.reporting"));
    let body = batch(json!([{ "id": "c-1", "name": "Ann", "consents": { "email_ok": true } }]));
    let r = run(&p, "both", &body);
    let d = decision_for(&r.log, "$.customers[*].name", "c-1");
    assert_eq!(d.purpose.as_deref(), Some("marketing.email"));
}

#[test]
fn each_action_does_what_it_says() {
    let p = policy();
    let body = batch(json!([{
        "id": "c-1", "email": "ann@example.com", "name": "Ann",
        "ssn": "123-45-6789", "phone": "+44 7700 900123"
    }]));
    // `nothing` has no purposes: every declared field is denied.
    let r = run(&p, "nothing", &body);
    let c = &r.out["customers"][0];
    assert!(c.get("email").is_none(), "strip");
    assert_eq!(c["name"], "[redacted]", "redact");
    let h = c["ssn"].as_str().unwrap();
    assert!(h.starts_with("h1:") && h.len() == 35, "hash: {h}");
    assert_eq!(c["phone"], "*************23", "mask keeps the last 2");
    assert_eq!(c["id"], "c-1", "undeclared fields pass by default");
    // Hashing is keyed and stable, so joins still work.
    let r2 = run(&p, "nothing", &body);
    assert_eq!(r2.out["customers"][0]["ssn"], c["ssn"]);
    assert_eq!(
        count_where(&r.log, |g| g.reason == Some(Reason::NoPurpose)),
        4
    );
    for (path, action) in [
        ("$.customers[*].email", "strip"),
        ("$.customers[*].name", "redact"),
        ("$.customers[*].ssn", "hash"),
        ("$.customers[*].phone", "mask"),
    ] {
        let d = decision_for(&r.log, path, "c-1");
        assert_eq!(
            (d.action, d.reason, d.n),
            (action, Some(Reason::NoPurpose), 1)
        );
    }
}

#[test]
fn block_refuses_the_message_and_names_only_categories() {
    let p = policy();
    let body = batch(json!([{ "id": "c-1", "health": "diabetes", "email": "ann@example.com" }]));
    let ex = exchange(&p, "crm", "stats", "/v1/customers", &[]);
    let r = run_with(&p, &ex, Direction::Request, &body, &StoreAnswers::new());
    assert!(r.report.is_blocked());
    assert_eq!(r.log.outcome, Outcome::Blocked);
    assert_eq!(r.log.status, Some(403));
    let reply: Value =
        serde_json::from_slice(&p.block_response(&ex, Direction::Request, &r.report)).unwrap();
    assert_eq!(reply["error"], "consentry_blocked");
    assert_eq!(reply["policy"], "test-policy");
    assert_eq!(reply["categories"], json!(["user.health"]));
    let text = reply.to_string();
    assert!(!text.contains("diabetes") && !text.contains("ann@"));
    // The vital-interests service may receive it.
    assert!(!run(&p, "er", &body).report.is_blocked());
}

#[test]
fn audit_mode_logs_what_enforce_would_do_and_is_not_enforced() {
    let p = compile(&policy_json(json!({ "mode": "audit" })));
    let body = batch(json!([{ "id": "c-1", "email": "a@b.c", "health": "x" }]));
    let r = run(&p, "stats", &body);
    assert_eq!(r.log.mode, "audit");
    assert_eq!(
        r.log.outcome,
        Outcome::Blocked,
        "what enforce would have done"
    );
    assert!(!r.log.enforced);
    assert_eq!(r.log.status, None, "nothing is refused");
}

#[test]
fn undeclared_fields_pass_or_are_stripped() {
    let body = batch(json!([{
        "id": "c-1", "email": "a@b.c", "hobby": "chess",
        "address": { "city": "Leeds", "street": "1 Road" }, "tags": ["a", "b"]
    }]));
    let p = policy();
    assert_eq!(run(&p, "crm", &body).out, body);
    let p = compile(&policy_json(json!({ "undeclared": "strip" })));
    let r = run(&p, "crm", &body);
    let c = &r.out["customers"][0];
    assert_eq!(c["email"], "a@b.c");
    for k in ["id", "hobby", "address", "tags"] {
        assert!(c.get(k).is_none(), "{k} is undeclared and stripped");
    }
    let d = decision_for(&r.log, "$.customers[*].address", "c-1");
    assert_eq!((d.action, d.reason), ("strip", Some(Reason::Undeclared)));
    assert_eq!(d.category, "undeclared");
    // Every undeclared field of the record, in one group: id, hobby, address, tags.
    assert_eq!(
        d.paths,
        ["id", "hobby", "address", "tags"].map(|k| format!("$.customers[*].{k}"))
    );
    assert_eq!(d.n, 4);
    assert_eq!(r.out["page"], 1, "minimisation applies inside records only");
}

#[test]
fn declared_objects_cover_their_children_under_minimisation() {
    let mut v = policy_json(json!({ "undeclared": "strip" }));
    v["messages"][0]["fields"] = json!([
        { "path": "$.address", "category": "user.contact.address" },
        { "path": "$.address.geo", "category": "user.location.precise" }
    ]);
    let p = compile(&v);
    let body = batch(json!([{ "address": { "city": "Leeds", "geo": [53.8, -1.5] }, "x": 1 }]));
    let r = run(&p, "crm", &body);
    assert_eq!(
        r.out["customers"][0],
        json!({ "address": { "city": "Leeds", "geo": [53.8, -1.5] } })
    );
    // A recipient allowed the address but not precise location loses only the latter.
    let mut v2 = v.clone();
    v2["purposes"]["essential.account"]["allows"] = json!(["user.contact"]);
    let r = run(&compile(&v2), "crm", &body);
    assert_eq!(
        r.out["customers"][0],
        json!({ "address": { "city": "Leeds" } })
    );
}

#[test]
fn both_directions_judge_for_the_recipient_of_the_bytes() {
    let p = policy();
    let body = batch(json!([{ "id": "c-1", "email": "a@b.c" }]));
    // The mailer calls the CRM: the request goes to crm, the response back to mailer.
    let ex = p.exchange(
        None,
        "GET",
        "/v1/customers",
        p.identify_caller(Some("spiffe://t/mailer"), None),
        p.identify_upstream(Some("crm"), None),
        &[],
    );
    let req = run_with(&p, &ex, Direction::Request, &body, &StoreAnswers::new());
    assert_eq!(req.out, body, "crm may have it");
    assert_eq!(req.log.recipient, "crm");
    let resp = run_with(&p, &ex, Direction::Response, &body, &StoreAnswers::new());
    assert!(
        resp.out["customers"][0].get("email").is_none(),
        "mailer without consent may not"
    );
    assert_eq!(
        (resp.log.caller.as_str(), resp.log.recipient.as_str()),
        ("mailer", "mailer")
    );
    assert_eq!(resp.log.direction, "response");
}

#[test]
fn services_are_recognised_by_cluster_authority_principal_and_trusted_header() {
    let p = policy();
    let name = |party: Party| party.service.map(|s| p.service_name(s).to_string());
    assert_eq!(
        name(p.identify_upstream(Some("mailer"), None)),
        Some("mailer".into())
    );
    assert_eq!(
        name(p.identify_upstream(None, Some("Mailer.internal:8080"))),
        Some("mailer".into())
    );
    assert_eq!(
        name(p.identify_upstream(Some("elsewhere"), Some("x"))),
        None
    );
    assert_eq!(
        name(p.identify_caller(Some("spiffe://t/crm"), None)),
        Some("crm".into())
    );
    assert_eq!(
        name(p.identify_caller(None, Some("mailer"))),
        Some("mailer".into())
    );
    // The mTLS identity wins over the header.
    assert_eq!(
        name(p.identify_caller(Some("spiffe://t/crm"), Some("mailer"))),
        Some("crm".into())
    );
    // Without a trusted caller header in the policy, the header means nothing.
    let mut v = policy_json(json!({}));
    v.as_object_mut().unwrap().remove("identity");
    let p2 = compile(&v);
    assert_eq!(p2.identify_caller(None, Some("mailer")).service, None);
}

#[test]
fn an_unknown_recipient_gets_no_declared_field() {
    let p = policy();
    let body = batch(
        json!([{ "id": "c-1", "email": "a@b.c", "name": "Ann", "age": 3, "consents": { "email_ok": true } }]),
    );
    let r = run(&p, "somewhere-else", &body);
    let c = &r.out["customers"][0];
    assert!(c.get("email").is_none() && c.get("age").is_none());
    assert_eq!(c["name"], "[redacted]");
    assert!(r.log.recipient.starts_with("unknown("));
    assert!(!r.log.decisions.is_empty());
    assert!(r
        .log
        .decisions
        .iter()
        .all(|g| g.reason == Some(Reason::NoPurpose)));
}

#[test]
fn consent_from_a_trusted_header_only() {
    let p = policy();
    let body = batch(json!([{ "id": "c-1", "email": "a@b.c" }, { "id": "c-2", "email": "b@b.c" }]));
    let hdr = [("x-consent", "c-1=email_ok; c-2=other")];
    let ex = p.exchange(
        None,
        "POST",
        "/v1/customers",
        p.identify_caller(Some("spiffe://t/gateway"), None),
        p.identify_upstream(Some("mailer"), None),
        &hdr.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>(),
    );
    let r = run_with(&p, &ex, Direction::Request, &body, &StoreAnswers::new());
    assert_eq!(r.out["customers"][0]["email"], "a@b.c");
    assert!(r.out["customers"][1].get("email").is_none());
    assert!(
        r.store_subjects.is_empty(),
        "the header answered for both subjects"
    );
    let ann = decision_for(&r.log, "$.customers[*].email", "c-1");
    assert_eq!(
        (ann.action, ann.evidence.as_deref()),
        ("allow", Some("header:x-consent"))
    );
    let bob = decision_for(&r.log, "$.customers[*].email", "c-2");
    assert_eq!(
        (bob.action, bob.evidence.as_deref()),
        ("strip", Some("header:x-consent"))
    );
    // The same header from a caller the policy does not trust is ignored, and says so.
    let ex = exchange(&p, "crm", "mailer", "/v1/customers", &hdr);
    let r = run_with(&p, &ex, Direction::Request, &body, &StoreAnswers::new());
    assert!(r.out["customers"][0].get("email").is_none());
    assert!(r
        .log
        .detail
        .as_deref()
        .unwrap_or("")
        .contains("not trusted"));
    // Repeated: conflicting claims are not guessed between.
    let twice = [("x-consent", "c-1=email_ok"), ("x-consent", "c-1=")];
    let hv: Vec<(String, String)> = twice
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let ex = p.exchange(
        None,
        "POST",
        "/v1/customers",
        p.identify_caller(Some("spiffe://t/gateway"), None),
        p.identify_upstream(Some("mailer"), None),
        &hv,
    );
    assert!(ex.header_consent.is_none());
}

#[test]
fn consent_from_the_store_for_subjects_the_record_does_not_answer() {
    let p = policy();
    let body = batch(json!([
        { "id": "c-1", "email": "a@b.c", "consents": { "email_ok": false } },
        { "id": "c-2", "email": "b@b.c" },
        { "id": "c-3", "email": "c@b.c" },
        { "id": 4, "email": "d@b.c" }
    ]));
    let ex = exchange(&p, "crm", "mailer", "/v1/customers", &[]);
    let first = run_with(&p, &ex, Direction::Request, &body, &StoreAnswers::new());
    assert_eq!(
        first.store_subjects,
        vec!["c-2", "c-3", "4"],
        "c-1's record answers for itself"
    );
    let mut store = StoreAnswers::new();
    store.insert(
        "c-2".into(),
        ConsentAnswer::Known([("email_ok".to_string(), true)].into()),
    );
    store.insert("c-3".into(), ConsentAnswer::Unknown);
    store.insert(
        "4".into(),
        ConsentAnswer::Known([("email_ok".to_string(), true)].into()),
    );
    let r = run_with(&p, &ex, Direction::Request, &body, &store);
    let c = &r.out["customers"];
    assert!(c[0].get("email").is_none(), "the record's own refusal wins");
    assert_eq!(c[1]["email"], "b@b.c");
    assert!(c[2].get("email").is_none());
    assert_eq!(c[3]["email"], "d@b.c", "numeric ids are subjects too");
    for (subject, action, evidence) in [
        ("c-1", "strip", "record:$.consents.email_ok"),
        ("c-2", "allow", "store"),
        ("c-3", "strip", "store:unknown_subject"),
        ("4", "allow", "store"),
    ] {
        let d = decision_for(&r.log, "$.customers[*].email", subject);
        assert_eq!((d.action, d.evidence.as_deref()), (action, Some(evidence)));
    }
    // c-2 and 4: one group, two subjects, two decisions.
    let from_store = decision_for(&r.log, "$.customers[*].email", "4");
    assert_eq!((from_store.n, &from_store.subjects), (2, &vec![1, 3]));
    // Recipients without a consent purpose never cause a lookup.
    let ex = exchange(&p, "crm", "stats", "/v1/customers", &[]);
    assert!(
        run_with(&p, &ex, Direction::Request, &body, &StoreAnswers::new())
            .store_subjects
            .is_empty()
    );
}

#[test]
fn headers_and_query_parameters_are_judged_too() {
    let p = policy();
    let h = [("x-email", "ann@example.com"), ("x-customer", "c-1")];
    let ex = exchange(
        &p,
        "crm",
        "stats",
        "/v1/customers?email=ann%40example.com&page=2",
        &h,
    );
    assert_eq!(ex.message_subject.as_deref(), Some("c-1"));
    let headers: Vec<(String, String)> = h
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let v = p.judge_headers(&ex, Direction::Request, &headers, &StoreAnswers::new());
    assert_eq!(
        v.set_headers,
        vec![("x-email".to_string(), vec![])],
        "stripped"
    );
    assert_eq!(
        v.new_path.as_deref(),
        Some("/v1/customers?email=%5Bredacted%5D&page=2")
    );
    assert_eq!(v.report.decisions(), 2);
    let log = p.decision_log(&ex, Direction::Request, &v.report, None, 0);
    check_record(&log);
    assert_eq!(log.subjects, [pseudonym("c-1")]);
    let header = decision_for(&log, "header:x-email", "c-1");
    assert_eq!((header.action, header.n), ("strip", 1));
    let query = decision_for(&log, "query:email", "c-1");
    assert_eq!((query.action, query.n), ("redact", 1));
    // The mailer needs consent for the subject named in x-customer: ask the store.
    let ex = exchange(&p, "crm", "mailer", "/v1/customers?email=a", &h);
    assert_eq!(
        p.plan_headers(&ex, Direction::Request, &headers)
            .store_subjects,
        vec!["c-1"]
    );
    let mut store = StoreAnswers::new();
    store.insert(
        "c-1".into(),
        ConsentAnswer::Known([("email_ok".to_string(), true)].into()),
    );
    let v = p.judge_headers(&ex, Direction::Request, &headers, &store);
    assert!(v.set_headers.is_empty() && v.new_path.is_none());
}

#[test]
fn routes_the_policy_does_not_cover_are_not_inspected() {
    let p = policy();
    assert!(p
        .binding_for(Direction::Request, "POST", "/v1/customers/42")
        .is_some());
    assert!(p
        .binding_for(Direction::Request, "POST", "/v1/customers?x=1")
        .is_some());
    assert!(p
        .binding_for(Direction::Request, "POST", "/v1/customersX")
        .is_none());
    assert!(p
        .binding_for(Direction::Response, "GET", "/health")
        .is_none());
}

#[test]
fn what_cannot_be_inspected_is_refused_with_a_reason() {
    let p = policy();
    let ex = exchange(&p, "crm", "mailer", "/v1/customers", &[]);
    let d = Direction::Request;
    let body = br#"{"customers":[]}"#;
    let kind = |ct: Option<&str>, enc: Option<&str>, b: &[u8]| {
        p.plan_body(&ex, d, ct, enc, b).err().map(|e| e.kind)
    };
    assert_eq!(
        kind(Some("text/plain"), None, body),
        Some(UninspectableKind::UnsupportedMediaType)
    );
    assert_eq!(
        kind(None, None, body),
        Some(UninspectableKind::UnsupportedMediaType)
    );
    assert_eq!(
        kind(Some("application/json"), Some("br"), body),
        Some(UninspectableKind::UnsupportedEncoding)
    );
    assert_eq!(
        kind(Some("application/json"), Some("gzip, zstd"), body),
        Some(UninspectableKind::UnsupportedEncoding)
    );
    assert_eq!(
        kind(Some("application/json"), Some("gzip"), body),
        Some(UninspectableKind::Malformed),
        "not gzip at all"
    );
    assert_eq!(
        kind(Some("application/json"), None, b"{\"customers\": [1,"),
        Some(UninspectableKind::Malformed)
    );
    assert_eq!(
        kind(Some("application/problem+json; charset=utf-8"), None, body),
        None
    );
    assert_eq!(kind(Some("application/json"), Some("identity"), body), None);
    assert_eq!(
        kind(Some("application/json"), None, b""),
        None,
        "an empty body has nothing to inspect"
    );
    let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
    assert_eq!(
        kind(Some("application/json"), None, deep.as_bytes()),
        Some(UninspectableKind::TooDeep)
    );
    let deeper = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    assert_eq!(
        kind(Some("application/json"), None, deeper.as_bytes()),
        Some(UninspectableKind::TooDeep)
    );
    let big = compile(&policy_json(
        json!({ "limits": { "max_body_bytes": 10, "max_records": 2 } }),
    ));
    let ex2 = exchange(&big, "crm", "mailer", "/v1/customers", &[]);
    let e = big
        .plan_body(&ex2, d, Some("application/json"), None, body)
        .unwrap_err();
    assert_eq!(
        (e.kind, e.status(d), e.status(Direction::Response)),
        (UninspectableKind::TooLarge, 413, 502)
    );
    let small = compile(&policy_json(json!({ "limits": { "max_records": 2 } })));
    let ex3 = exchange(&small, "crm", "mailer", "/v1/customers", &[]);
    let e = small
        .plan_body(
            &ex3,
            d,
            Some("application/json"),
            None,
            br#"{"customers":[{},{},{}]}"#,
        )
        .unwrap_err();
    assert_eq!(e.kind, UninspectableKind::TooManyRecords);
    // The refusal names the policy and the reason, and the log says it was enforced.
    let f = Uninspectable::new(UninspectableKind::Malformed, "body is not valid JSON");
    let reply: Value = serde_json::from_slice(&p.uninspectable_response(&ex, d, &f)).unwrap();
    assert_eq!(reply["reason"], "malformed_json");
    let log = p.decision_log(&ex, d, &Report::default(), Some(&f), 0);
    assert_eq!(
        (log.outcome, log.enforced, log.status),
        (Outcome::Uninspectable, true, Some(400))
    );
    // fail: open lets it pass, logged as not enforced.
    let open = compile(&policy_json(json!({ "fail": "open" })));
    let log = open.decision_log(&ex, d, &Report::default(), Some(&f), 0);
    assert_eq!(
        (log.outcome, log.enforced, log.status),
        (Outcome::Uninspectable, false, None)
    );
}

#[test]
fn the_decision_log_never_holds_a_customer_value() {
    let p = policy();
    let secrets = [
        "ann@example.com",
        "Annabel",
        "123-45-6789",
        "+44 7700 900123",
        "c-secret-id",
        "asthma",
    ];
    let body = batch(json!([{
        "id": "c-secret-id", "email": secrets[0], "name": secrets[1], "ssn": secrets[2],
        "phone": secrets[3], "health": secrets[5], "consents": { "email_ok": true }
    }]));
    for to in ["crm", "mailer", "stats", "nothing", "unknown"] {
        let r = run(&p, to, &body);
        let text = r.log.to_json();
        for s in secrets {
            assert!(!text.contains(s), "log for {to} contains {s}: {text}");
        }
        assert_eq!(r.log.subjects, [pseudonym("c-secret-id")]);
        assert!(r.log.decisions.iter().all(|g| g.subjects == [0]));
    }
}

#[test]
fn large_batches_are_aggregated_not_cut_short() {
    let p = policy();
    let records: Vec<Value> = (0..300)
        .map(|i| json!({ "id": format!("c-{i}"), "email": "x@y.z", "age": 1 }))
        .collect();
    let r = run(&p, "stats", &batch(Value::Array(records)));
    // Every decision is in a group: one per category here, each standing for 300.
    assert_eq!(r.log.decisions.len(), 2);
    let all: Vec<usize> = (0..300).collect();
    let email = decision_for(&r.log, "$.customers[*].email", "c-7");
    assert_eq!(
        (
            email.action,
            email.reason,
            email.n,
            &email.subjects,
            email.folded
        ),
        ("strip", Some(Reason::NoPurpose), 300, &all, 0)
    );
    let age = decision_for(&r.log, "$.customers[*].age", "c-299");
    assert_eq!(
        (age.action, age.purpose.as_deref(), age.n, &age.subjects),
        ("allow", Some("analytics.reporting"), 300, &all)
    );
    assert_eq!(r.log.subjects.len(), 300);
    assert_eq!(r.log.subjects[7], pseudonym("c-7"));
    assert_eq!(r.log.records, 300);
    let text = r.log.to_json();
    assert!(text.contains(r#""subjects":"0-299""#), "{text}");
    assert!(!text.contains("c-7"), "raw subjects are never logged");
    assert_eq!(r.log.counts.get("strip"), Some(&300));
    assert_eq!(r.log.counts.get("allow"), Some(&300));
    // Per category (what the proxy's counters are made of) nothing is cut short.
    let mut per_category = r.log.category_counts.clone();
    per_category.sort();
    assert_eq!(
        per_category,
        [
            ("user.contact.email".to_string(), "strip", 300),
            ("user.demographic.age".to_string(), "allow", 300)
        ]
    );
    assert!(!r.log.to_json().contains("category_counts"));
}

#[test]
fn the_example_policy_compiles() {
    let text = include_str!("../../../policies/acme-customers.json");
    Policy::compile(text.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn policy_errors_are_all_reported_with_where_and_what_to_do() {
    let mut v = policy_json(json!({}));
    v["purposes"]["marketing.email"]
        .as_object_mut()
        .unwrap()
        .remove("consent_key");
    v["purposes"]["legal.tax"]["consent_key"] = json!("x");
    v["services"]["crm"]["purposes"] = json!(["no.such"]);
    v["services"]["stats"]["clusters"] = json!(["crm"]);
    v["messages"][0]["fields"][0]["path"] = json!("$.a[?@.b == 1]");
    v["messages"][0]["fields"][1]["category"] = json!("User Name");
    v["messages"][0]["subject"] = json!("$.ids[*]");
    v["consent"]["header"]["trusted_callers"] = json!(["ghost"]);
    let errs = Policy::compile(v.to_string().as_bytes(), &env)
        .unwrap_err()
        .0;
    let at = |ptr: &str| {
        errs.iter()
            .find(|e| e.pointer == ptr)
            .unwrap_or_else(|| panic!("no error at {ptr}: {errs:#?}"))
            .message
            .clone()
    };
    assert!(at("/purposes/marketing.email/basis").contains("consent_key"));
    assert!(at("/purposes/legal.tax/consent_key").contains("remove consent_key"));
    assert!(at("/services/crm/purposes/0").contains("not defined"));
    assert!(at("/services/stats/clusters/0").contains("claimed by services"));
    assert!(at("/messages/0/fields/0/path").contains("filter"));
    assert!(at("/messages/0/fields/1/category").contains("dotted"));
    assert!(at("/messages/0/subject").contains("exactly one"));
    assert!(at("/consent/header/trusted_callers/0").contains("ghost"));
    assert_eq!(errs.len(), 8, "{errs:#?}");
}

#[test]
fn syntax_and_shape_errors_carry_line_and_column() {
    let e = Policy::compile(b"{\n  \"consentry\": 1,\n  \"name\": \"x\",,\n}", &env)
        .unwrap_err()
        .0;
    assert_eq!((e[0].line, e.len()), (Some(3), 1));
    assert!(e[0].message.contains("not valid JSON"));
    let mut v = policy_json(json!({}));
    v["mode"] = json!("enforcing");
    let text = serde_json::to_string_pretty(&v).unwrap();
    let e = Policy::compile(text.as_bytes(), &env).unwrap_err().0;
    assert!(
        e[0].line.is_some() && e[0].message.contains("enforcing"),
        "{e:?}"
    );
    let mut v = policy_json(json!({}));
    v["servces"] = json!({});
    let e = Policy::compile(v.to_string().as_bytes(), &env)
        .unwrap_err()
        .0;
    assert!(e[0].message.contains("unknown field `servces`"), "{e:?}");
}

#[test]
fn a_key_written_twice_is_refused_and_meaning_errors_have_lines_too() {
    // serde_json would silently keep the second `mode`; a reader of the text might
    // believe the first.
    let e = Policy::compile(
        b"{\n  \"consentry\": 1,\n  \"mode\": \"enforce\",\n  \"mode\": \"audit\"\n}",
        &env,
    )
    .unwrap_err()
    .0;
    assert_eq!(
        (e[0].line, e[0].column, e.len()),
        (Some(4), Some(3), 1),
        "{e:?}"
    );
    assert!(e[0].message.contains("duplicate key \"mode\""), "{e:?}");
    // An error found when compiling (not when reading) is placed at its value as well.
    let mut v = policy_json(json!({}));
    v["limits"] = json!({ "max_records": 0 });
    let text = serde_json::to_string_pretty(&v).unwrap();
    let e = Policy::compile(text.as_bytes(), &env).unwrap_err().0;
    let line = text
        .lines()
        .position(|l| l.contains("\"max_records\""))
        .unwrap()
        + 1;
    assert_eq!(
        (e[0].pointer.as_str(), e[0].line),
        ("/limits/max_records", Some(line)),
        "{e:?}"
    );
}

#[test]
fn a_policy_that_needs_a_key_it_was_not_given_does_not_start() {
    let v = policy_json(json!({}));
    let none = |_: &str| None;
    let errs = Policy::compile(v.to_string().as_bytes(), &none)
        .unwrap_err()
        .0;
    let ptrs: Vec<_> = errs.iter().map(|e| e.pointer.as_str()).collect();
    assert_eq!(ptrs, ["/keys/hash_key_env", "/keys/subject_key_env"]);
    assert!(errs[0].message.contains("vm_config.environment_variables"));
    let short = |_: &str| Some("short".to_string());
    assert!(Policy::compile(v.to_string().as_bytes(), &short).is_err());
    // A policy without hash actions or subjects needs no key.
    let mut v = policy_json(json!({}));
    v["messages"][0] =
        json!({ "name": "m", "fields": [{ "path": "$.a", "category": "user.name" }] });
    assert!(Policy::compile(v.to_string().as_bytes(), &none).is_ok());
}

#[test]
fn ambiguous_json_is_refused_and_spellings_of_a_declared_key_are_judged() {
    let p = policy();
    let ex = exchange(&p, "crm", "stats", "/v1/customers", &[]);
    let d = Direction::Request;
    // Which `email` would the recipient read? Refuse rather than guess.
    let dup = br#"{"customers":[{"id":"c-1","email":"a@b.c","email":"x"}]}"#;
    let e = p
        .plan_body(&ex, d, Some("application/json"), None, dup)
        .unwrap_err();
    assert_eq!(
        (e.kind, e.code(), e.status(d)),
        (UninspectableKind::Ambiguous, "ambiguous_json", 400)
    );
    assert!(!e.detail.contains("a@b.c"), "{}", e.detail);
    let escaped = br#"{"customers":[{"email":"a@b.c","em\u0061il":"x"}]}"#;
    assert_eq!(
        p.plan_body(&ex, d, Some("application/json"), None, escaped)
            .unwrap_err()
            .kind,
        UninspectableKind::Ambiguous
    );
    // A key spelled with escapes, or in another case, is still the declared field.
    let body: Value = serde_json::from_slice(
        br#"{"customers":[{"id":"c-1","\u0065mail":"a@b.c","EMAIL":"b@b.c","Email":"c@b.c"}]}"#,
    )
    .unwrap();
    let r = run(&p, "stats", &body);
    let c = r.out["customers"][0].as_object().unwrap();
    assert!(c.keys().all(|k| !k.eq_ignore_ascii_case("email")), "{c:?}");
    assert_eq!(
        count_where(&r.log, |g| g.category == "user.contact.email"),
        3
    );
    let email = decision_for(&r.log, "$.customers[*].email", "c-1");
    assert_eq!(
        email.paths,
        [
            "$.customers[*].email",
            "$.customers[*].EMAIL",
            "$.customers[*].Email"
        ]
    );
    assert_eq!((email.action, email.n), ("strip", 3));
}

#[test]
fn gzip_and_deflate_bodies_are_judged_and_sent_back_encoded_the_same_way() {
    use flate2::{read::GzDecoder, write::GzEncoder, Compression};
    use std::io::{Read, Write};
    let p = policy();
    let ex = exchange(&p, "crm", "stats", "/v1/customers", &[]);
    let json = batch(json!([{ "id": "c-1", "email": "a@b.c", "age": 30 }])).to_string();
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(json.as_bytes()).unwrap();
    let wire = e.finish().unwrap();
    let plan = p
        .plan_body(
            &ex,
            Direction::Request,
            Some("application/json"),
            Some("gzip"),
            &wire,
        )
        .unwrap();
    let v = p.judge_body(&ex, Direction::Request, plan, &StoreAnswers::new());
    let out = v.body.expect("changed");
    let mut text = String::new();
    GzDecoder::new(&out[..])
        .read_to_string(&mut text)
        .expect("still gzip");
    let got: Value = serde_json::from_str(&text).unwrap();
    assert!(got["customers"][0].get("email").is_none());
    assert_eq!(got["customers"][0]["age"], 30);
    // A compressed body that would decompress past the limit is refused, not inflated.
    let small = compile(&policy_json(
        json!({ "limits": { "max_body_bytes": 1000 } }),
    ));
    let mut e = GzEncoder::new(Vec::new(), Compression::best());
    e.write_all(format!("{{\"customers\":[],\"pad\":\"{}\"}}", " ".repeat(5000)).as_bytes())
        .unwrap();
    let bomb = e.finish().unwrap();
    assert!(bomb.len() < 1000);
    let ex2 = exchange(&small, "crm", "stats", "/v1/customers", &[]);
    let err = small
        .plan_body(
            &ex2,
            Direction::Request,
            Some("application/json"),
            Some("gzip"),
            &bomb,
        )
        .unwrap_err();
    assert_eq!(err.kind, UninspectableKind::TooLarge);
}

#[test]
fn the_subject_is_found_in_any_spelling_of_its_key_but_never_guessed() {
    let p = policy();
    let ex = exchange(&p, "crm", "mailer", "/v1/customers", &[]);
    let body = batch(
        json!([{ "ID": "c-1", "email": "a@b.c" }, { "Id": "c-2", "ID": "c-3", "email": "b@b.c" }]),
    );
    let r = run_with(&p, &ex, Direction::Request, &body, &StoreAnswers::new());
    // One other spelling is the subject; two are ambiguous, so no subject at all.
    assert_eq!(r.store_subjects, vec!["c-1"]);
    assert_eq!(r.log.subjects, [pseudonym("c-1")]);
    let c1 = decision_for(&r.log, "$.customers[*].email", "c-1");
    assert_eq!((c1.evidence.as_deref(), c1.n), (Some("none"), 1));
    // The second record has no subject: its decision names none.
    let anonymous: Vec<_> = groups_at(&r.log, "$.customers[*].email")
        .into_iter()
        .filter(|g| g.subjects.is_empty())
        .collect();
    assert_eq!(anonymous.len(), 1, "{}", r.log.to_json());
    assert_eq!(
        (anonymous[0].evidence.as_deref(), anonymous[0].n),
        (Some("none:no_subject"), 1)
    );
}

#[test]
fn the_consent_cache_is_bounded_and_keyed_by_pseudonym() {
    let p = policy();
    let slots: std::collections::HashSet<String> = (0..100_000)
        .map(|i| p.cache_slot(&format!("c-{i}")).0)
        .collect();
    assert!(slots.len() as u64 <= eval::CONSENT_CACHE_SLOTS);
    let (key, id) = p.cache_slot("c-secret");
    assert!(!key.contains("c-secret") && !id.contains("c-secret") && id.starts_with("s2:"));
    assert_eq!(id, pseudonym("c-secret"));
}

// --- Deciding at headers: recipients that may have everything ---

fn unread(p: &Policy, cluster: &str) -> Option<Vec<Grant>> {
    let b = p.binding_for(Direction::Request, "POST", "/v1/customers")?;
    let recipient = p.identify_upstream(Some(cluster), None).service;
    let grants = p.unread_grants(b, recipient);
    assert_eq!(p.decided_at_headers(b, recipient), grants.is_some());
    grants
}

#[test]
fn a_recipient_allowed_every_category_without_consent_is_decided_at_headers() {
    let p = policy();
    let grants = unread(&p, "crm").expect("crm may have every category of the batch");
    let cats: Vec<&str> = grants.iter().map(|g| g.category.as_str()).collect();
    // Fields first, in policy order, then the header's and the query's (already seen).
    assert_eq!(
        cats,
        [
            "user.contact.email",
            "user.name",
            "user.government_id",
            "user.contact.phone_number",
            "user.health",
            "user.demographic.age"
        ]
    );
    assert!(grants
        .iter()
        .all(|g| g.purpose == "essential.account" && g.basis == "contract"));
    // Some category missing (stats), or allowed only with consent (mailer): read it.
    assert_eq!(unread(&p, "stats"), None);
    assert_eq!(unread(&p, "mailer"), None);
    assert_eq!(unread(&p, "nothing"), None);
    // An unknown recipient gets nothing without reading.
    let b = p
        .binding_for(Direction::Request, "POST", "/v1/customers")
        .unwrap();
    assert_eq!(p.unread_grants(b, None), None);
}

#[test]
fn a_consent_purpose_first_does_not_stop_a_later_basis_that_always_holds() {
    let p = compile(&policy_json(json!({
        "services": {
            "crm": { "clusters": ["crm"], "purposes": ["marketing.all", "essential.account"] }
        },
        "purposes": {
            "marketing.all": { "basis": "consent", "consent_key": "k", "allows": ["user"] },
            "essential.account": { "basis": "contract", "allows": ["user"] }
        },
        "identity": {},
        "consent": {}
    })));
    let grants = unread(&p, "crm").unwrap();
    assert!(grants.iter().all(|g| g.purpose == "essential.account"));
}

#[test]
fn every_field_logging_or_undeclared_strip_reads_every_body() {
    let listed = compile(&policy_json(json!({ "log": { "every_field": true } })));
    assert_eq!(unread(&listed, "crm"), None);
    let strict = compile(&policy_json(json!({ "undeclared": "strip" })));
    assert_eq!(unread(&strict, "crm"), None);
}

#[test]
fn an_unread_message_is_logged_with_its_grants() {
    let p = policy();
    let ex = exchange(&p, "gateway", "crm", "/v1/customers", &[]);
    let mut report = Report::default();
    report.unread = unread(&p, "crm");
    let log = p.decision_log(&ex, Direction::Request, &report, None, 0);
    // Logged only with log.untouched: the policy alone let it through.
    assert!(!log.touched());
    assert_eq!(log.outcome, Outcome::Allowed);
    let v: Value = serde_json::from_str(&log.to_json()).unwrap();
    assert_eq!(v["inspected"], json!(false));
    assert_eq!(
        v["allowed_categories"][0],
        json!({"category": "user.contact.email", "purpose": "essential.account", "basis": "contract"})
    );
    // An inspected message's entry does not carry the key.
    let read = p.decision_log(&ex, Direction::Request, &Report::default(), None, 0);
    let v: Value = serde_json::from_str(&read.to_json()).unwrap();
    assert!(v.get("inspected").is_none() && v.get("allowed_categories").is_none());
}

#[test]
fn a_record_lists_a_bounded_number_of_path_templates_and_counts_the_rest() {
    let p = compile(&policy_json(json!({ "undeclared": "strip" })));
    let mut rec = serde_json::Map::new();
    rec.insert("id".into(), json!("c-1"));
    for i in 0..300 {
        rec.insert(format!("k{i}"), json!(i));
    }
    let r = run(&p, "crm", &batch(json!([Value::Object(rec)])));
    let d = decision_for(&r.log, "$.customers[*].id", "c-1");
    assert_eq!((d.action, d.reason), ("strip", Some(Reason::Undeclared)));
    assert_eq!(d.n, 301, "every decision is counted");
    assert_eq!(d.paths.len(), MAX_LOGGED_PATHS);
    assert_eq!(
        d.folded,
        301 - MAX_LOGGED_PATHS,
        "and the unlisted ones said"
    );
    assert!(r
        .log
        .to_json()
        .contains(&format!(r#""folded":{}"#, 301 - MAX_LOGGED_PATHS)));
}

#[test]
fn the_headers_and_the_body_of_one_message_make_one_record() {
    let p = policy();
    let h = [("x-email", "ann@example.com"), ("x-customer", "c-2")];
    let ex = exchange(&p, "crm", "stats", "/v1/customers", &h);
    let headers: Vec<(String, String)> = h
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut report = p
        .judge_headers(&ex, Direction::Request, &headers, &StoreAnswers::new())
        .report;
    let body = batch(json!([{ "id": "c-1", "email": "a@b.c" }, { "id": "c-2", "email": "b@b.c" }]));
    let bytes = body.to_string();
    let plan = p
        .plan_body(
            &ex,
            Direction::Request,
            Some("application/json"),
            None,
            bytes.as_bytes(),
        )
        .unwrap();
    report.merge(
        p.judge_body(&ex, Direction::Request, plan, &StoreAnswers::new())
            .report,
    );
    let log = p.decision_log(&ex, Direction::Request, &report, None, 0);
    check_record(&log);
    // Subjects in first-seen order, each once: the header's c-2, then c-1.
    assert_eq!(log.subjects, ["c-2", "c-1"].map(pseudonym));
    assert_eq!(log.decisions.len(), 1, "{}", log.to_json());
    let email = &log.decisions[0];
    assert_eq!(
        (email.category.as_str(), email.action, email.reason),
        ("user.contact.email", "strip", Some(Reason::NoPurpose))
    );
    assert_eq!(email.paths, ["header:x-email", "$.customers[*].email"]);
    assert_eq!((email.n, &email.subjects), (3, &vec![0, 1]));
    assert_eq!(log.records, 2);
    assert_eq!(log.counts.get("strip"), Some(&3));
    assert_eq!(
        log.category_counts,
        [("user.contact.email".to_string(), "strip", 3)]
    );
}

#[test]
fn exact_paths_name_each_element_for_tools_and_tests() {
    let p = policy().with_exact_paths();
    let body = batch(json!([{ "id": "c-1", "email": "a@b.c" }, { "id": "c-2", "email": "b@b.c" }]));
    let r = run_exact(&p, &body);
    assert_eq!(
        r.decisions[0].paths,
        ["$.customers[0].email", "$.customers[1].email"]
    );
    assert_eq!(r.decisions[0].n, 2);
}

fn run_exact(p: &Policy, body: &Value) -> DecisionLog {
    let ex = exchange(p, "crm", "stats", "/v1/customers", &[]);
    let bytes = body.to_string();
    let plan = p
        .plan_body(
            &ex,
            Direction::Request,
            Some("application/json"),
            None,
            bytes.as_bytes(),
        )
        .unwrap();
    let v = p.judge_body(&ex, Direction::Request, plan, &StoreAnswers::new());
    p.decision_log(&ex, Direction::Request, &v.report, None, 0)
}
