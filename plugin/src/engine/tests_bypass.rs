//! No way around the policy: other spellings of a covered path, query parameter or
//! header, a claimed identity and a renamed envelope are judged or refused, never
//! passed unjudged. The rules are in `route.rs` and `policies/README.md`.

use super::tests::{batch, compile, exchange, policy, policy_json, run_with};
use super::*;
use serde_json::{json, Value};

fn covered(p: &Policy, path: &str) -> bool {
    p.binding_for(Direction::Request, "POST", path).is_some()
        && p.binding_for(Direction::Response, "POST", path).is_some()
}

fn one_customer() -> Value {
    json!({ "id": "c-1", "email": "ann@example.com", "name": "Ann", "age": 41 })
}

/// One customer in a message on `path` from `caller` to the service behind `cluster`.
fn one_customer_on(
    p: &Policy,
    caller: &str,
    cluster: &str,
    path: &str,
    d: Direction,
) -> super::tests::Run {
    let ex = exchange(p, caller, cluster, path, &[]);
    assert!(ex.route_refusal.is_none(), "{path}: {:?}", ex.route_refusal);
    let body = batch(json!([one_customer()]));
    run_with(p, &ex, d, &body, &StoreAnswers::new())
}

/// What `stats` (no purpose for e-mail) receives of one customer sent to `path`.
fn stats_view(p: &Policy, path: &str) -> Value {
    one_customer_on(p, "crm", "stats", path, Direction::Request).out
}

#[test]
fn every_spelling_of_a_covered_path_is_covered_in_both_directions() {
    let p = policy();
    for path in [
        "/v1/customers",
        "/v1/customers/",
        "//v1/customers",
        "/v1//customers/42",
        "/v1/./customers",
        "/v1/x/../customers",
        "/v1/x/%2e%2e/customers",
        "/v1/%63ustomers",
        "/%76%31/customers",
        "/V1/CUSTOMERS",
        "/v1/Customers/42",
        "/v1/customers;jsessionid=1",
        "/v1;v=2/customers/42",
        "/v1/x/..;/customers",
        "/v1/customers%3Bx",
        "/v1/customers#top",
        // Letters outside ASCII that case-insensitive Java and .NET routers read as `s`.
        "/v1/cu%C5%BFtomers",
        "/v1/cu\u{17f}tomers",
        "/./v1/customers?email=x",
    ] {
        assert!(covered(&p, path), "{path} is a spelling of /v1/customers");
        let got = stats_view(&p, path);
        assert!(
            got["customers"][0].get("email").is_none(),
            "{path}: e-mail reached stats: {got}"
        );
        // The response direction chooses its binding the same way.
        let r = one_customer_on(&p, "stats", "crm", path, Direction::Response);
        assert!(r.out["customers"][0].get("email").is_none(), "{path}");
    }
    for path in [
        "/v1/customersX",
        "/v1/other",
        "/v2/customers",
        "/v1customers",
        "/v1/customers.json",
    ] {
        assert!(!covered(&p, path), "{path} is another route");
    }
}

#[test]
fn a_path_without_one_safe_reading_is_refused_where_a_reading_could_be_covered() {
    let p = policy();
    for path in [
        "/v1%2Fcustomers",
        "/v1/customers%2F42",
        "/v1%5Ccustomers",
        "/v1\\customers",
        "/v1/customers%zz",
        "/v1/customers/%",
        "/v1/%u0063ustomers",
        "/v1%u002fcustomers",
        "/v1/customers%00.json",
        "/v1/customers%3Femail=ann%40example.com",
        "/v1/customers%3fx",
        "/v1/customers%23x",
        "/v1/customers\u{0}",
        "/v1/cust\u{1}omers/x/../../customers",
        "/../v1/customers",
        "/v1/../../v1/customers",
    ] {
        assert!(p.may_cover("POST", path), "{path:?}");
        let ex = exchange(&p, "crm", "stats", path, &[]);
        let refusal = ex
            .route_refusal
            .clone()
            .unwrap_or_else(|| panic!("{path:?} was not refused"));
        assert_eq!(refusal.kind, UninspectableKind::UnsafePath, "{path:?}");
        assert_eq!(refusal.code(), "unsafe_path");
        assert_eq!(refusal.status(Direction::Request), 400);
        assert_eq!(ex.binding(Direction::Request), None);
        let log = p.decision_log(
            &ex,
            Direction::Request,
            &Report::default(),
            Some(&refusal),
            0,
        );
        assert_eq!(log.outcome, Outcome::Uninspectable);
        assert!(log.enforced && log.status == Some(400), "{path:?}");
        let detail = log.detail.unwrap_or_default();
        assert!(detail.starts_with("unsafe_path: "), "{detail}");
        assert!(
            !detail.contains("customers"),
            "the detail names no path: {detail}"
        );
    }
    // No reading of these could be covered: they are uncovered traffic, not refused.
    for path in ["/static/a%2Fb", "/other%zz", "/assets/..%2f..%2fx", "/x\\y"] {
        let ex = exchange(&p, "crm", "stats", path, &[]);
        assert_eq!(ex.route_refusal, None, "{path}");
        assert_eq!(ex.binding(Direction::Request), None, "{path}");
        assert!(!p.may_cover("POST", path), "{path}");
    }
}

#[test]
fn a_service_may_declare_its_paths_case_sensitive() {
    let mut v = policy_json(json!({}));
    v["services"]["stats"]["case_sensitive_paths"] = json!(true);
    let p = compile(&v);
    let stats = p.identify_upstream(Some("stats"), None).service;
    let crm = p.identify_upstream(Some("crm"), None).service;
    let bindings = |path: &str, to| p.route("POST", path, to).unwrap().bindings;
    assert_eq!(bindings("/V1/Customers", stats), [None, None]);
    assert!(bindings("/v1//customers;x", stats)[0].is_some());
    assert!(bindings("/V1/Customers", crm)[0].is_some());
    // Without knowing the recipient, every case is covered (the cheap pre-check).
    assert!(p.may_cover("POST", "/V1/Customers"));
}

#[test]
fn policy_path_prefixes_are_canonical_too() {
    let mut v = policy_json(json!({}));
    v["messages"][0]["paths"] = json!(["/v1//Customers/./"]);
    let p = compile(&v);
    assert!(covered(&p, "/v1/customers/42"));
    v["messages"][0]["paths"] = json!(["/v1/a%2Fb", "/../x"]);
    let err = Policy::compile(v.to_string().as_bytes(), &super::tests::env).unwrap_err();
    assert_eq!(err.0.len(), 2, "{err}");
    assert!(
        err.0[0].pointer == "/messages/0/paths/0" && err.0[0].message.contains("encoded slash")
    );
    assert!(
        err.0[1].pointer == "/messages/0/paths/1" && err.0[1].message.contains("above the root")
    );
}

#[test]
fn the_decision_log_names_the_canonical_path_up_to_its_prefix() {
    let p = policy();
    let log = |path: &str| {
        one_customer_on(&p, "crm", "stats", path, Direction::Request)
            .log
            .path
    };
    assert_eq!(log("/v1/customers").as_deref(), Some("/v1/customers"));
    assert_eq!(
        log("//v1/./Customers?x=1").as_deref(),
        Some("/v1/Customers")
    );
    // The rest of the path may be a customer id: it is not logged.
    assert_eq!(
        log("/v1/customers/c-1001;x").as_deref(),
        Some("/v1/customers/…")
    );
}

/// `:path` after judging the request's query (`None`: unchanged).
fn judged_path(p: &Policy, to: &str, path: &str) -> (Option<String>, DecisionLog) {
    let ex = exchange(p, "crm", to, path, &[]);
    let v = p.judge_headers(&ex, Direction::Request, &[], &StoreAnswers::new());
    let log = p.decision_log(&ex, Direction::Request, &v.report, None, 0);
    super::tests::check_record(&log);
    (v.new_path, log)
}

#[test]
fn query_parameters_are_judged_in_every_spelling_frameworks_read() {
    let p = policy();
    for (query, expected) in [
        ("email=a%40b.c&page=2", "email=%5Bredacted%5D&page=2"),
        ("EMAIL=a%40b.c", "EMAIL=%5Bredacted%5D"),
        ("Email=a", "Email=%5Bredacted%5D"),
        ("email[]=a", "email[]=%5Bredacted%5D"),
        (
            "email[0]=a&email[1]=b",
            "email[0]=%5Bredacted%5D&email[1]=%5Bredacted%5D",
        ),
        ("email[work]=a", "email[work]=%5Bredacted%5D"),
        ("email%5B%5D=a", "email%5B%5D=%5Bredacted%5D"),
        ("e%6Dail=a", "e%6Dail=%5Bredacted%5D"),
        ("page=2;email=a;x", "page=2;email=%5Bredacted%5D;x"),
        (
            "email=a&email=b",
            "email=%5Bredacted%5D&email=%5Bredacted%5D",
        ),
        ("email=a&&page=1", "email=%5Bredacted%5D&page=1"),
    ] {
        let (path, report) = judged_path(&p, "stats", &format!("/v1/customers?{query}"));
        assert_eq!(
            path.as_deref(),
            Some(format!("/v1/customers?{expected}").as_str()),
            "{query}"
        );
        assert!(
            !report.decisions.is_empty()
                && report
                    .decisions
                    .iter()
                    .all(|g| g.paths == ["query:email"] && g.action == "redact"),
            "{query}: {:?}",
            report.decisions
        );
        let n = expected.matches("%5Bredacted%5D").count();
        assert_eq!(report.counts.get("redact"), Some(&n), "{query}");
    }
    // Not the bound parameter.
    for query in ["emails=a", "x_email=a", "page=1"] {
        let (path, report) = judged_path(&p, "stats", &format!("/v1/customers?{query}"));
        assert_eq!(path, None, "{query}");
        assert!(report.decisions.is_empty(), "{query}");
    }
    // A recipient that may have the e-mail gets every spelling unchanged.
    let (path, report) = judged_path(&p, "crm", "/v1/customers?EMAIL=a;email[]=b");
    assert_eq!(path, None);
    assert_eq!(report.counts.get("allow"), Some(&2));
}

#[test]
fn a_query_parameter_may_be_declared_case_sensitive() {
    let mut v = policy_json(json!({}));
    v["messages"][0]["query"][0]["case_sensitive"] = json!(true);
    let p = compile(&v);
    let (path, _) = judged_path(&p, "stats", "/v1/customers?EMAIL=a&email[]=b");
    assert_eq!(
        path.as_deref(),
        Some("/v1/customers?EMAIL=a&email[]=%5Bredacted%5D")
    );
    // On a header it means nothing, and says so.
    v["messages"][0]["headers"][0]["case_sensitive"] = json!(true);
    let err = Policy::compile(v.to_string().as_bytes(), &super::tests::env).unwrap_err();
    assert!(err
        .0
        .iter()
        .any(|e| e.pointer == "/messages/0/headers/0/case_sensitive"));
}

#[test]
fn the_message_subject_is_found_in_any_spelling_of_its_parameter_or_header() {
    let mut v = policy_json(json!({}));
    v["messages"][0]["message_subject"] = json!({ "query": "customer" });
    let p = compile(&v);
    for path in [
        "/v1/customers?customer=c-1",
        "/v1/customers?Customer=c-1",
        "/v1/customers?x=1;customer[]=c-1",
    ] {
        assert_eq!(
            exchange(&p, "crm", "stats", path, &[])
                .message_subject
                .as_deref(),
            Some("c-1"),
            "{path}"
        );
    }
    // Two spellings of one parameter are two subjects: neither is trusted.
    let ex = exchange(
        &p,
        "crm",
        "stats",
        "/v1/customers?customer=c-1&CUSTOMER=c-2",
        &[],
    );
    assert_eq!(ex.message_subject, None);
    let p = policy();
    let ex = exchange(
        &p,
        "crm",
        "stats",
        "/v1/customers",
        &[("x_customer", "c-1")],
    );
    assert_eq!(ex.message_subject.as_deref(), Some("c-1"));
}

#[test]
fn a_bound_header_is_judged_on_every_instance_and_spelling() {
    let p = policy();
    let headers: Vec<(String, String)> = [
        ("x-email", "a@b.c"),
        ("x-email", "b@b.c"),
        ("x_email", "c@b.c"),
        ("x-other", "kept"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let ex = exchange(&p, "crm", "stats", "/v1/customers", &[]);
    let v = p.judge_headers(&ex, Direction::Request, &headers, &StoreAnswers::new());
    assert_eq!(
        v.set_headers,
        vec![
            ("x-email".to_string(), vec![]),
            ("x_email".to_string(), vec![])
        ]
    );
    assert_eq!(
        v.report.counts().get("strip"),
        Some(&1),
        "one decision for the header"
    );
    let log = p.decision_log(&ex, Direction::Request, &v.report, None, 0);
    assert_eq!(log.decisions.len(), 1);
    assert_eq!(log.decisions[0].paths, ["header:x-email"]);
}

fn mesh_policy() -> Policy {
    compile(&policy_json(json!({
        "identity": { "caller_header": { "name": "x-caller", "trusted_from": ["gateway"] } }
    })))
}

#[test]
fn a_caller_header_is_trusted_only_from_the_principals_the_policy_names() {
    let p = mesh_policy();
    let who = |principal: Option<&str>, header: &[&str]| {
        let party = p.identify_caller_from(principal, header);
        (
            party.service.map(|s| p.service_name(s).to_string()),
            party.source.as_str(),
        )
    };
    let gw = Some("spiffe://t/gateway");
    let stranger = Some("spiffe://t/ns/elsewhere/sa/stranger");
    // The gateway may name the service it calls for; without a header it is itself.
    assert_eq!(who(gw, &["crm"]), (Some("crm".into()), "trusted_header"));
    assert_eq!(who(gw, &[" crm "]), (Some("crm".into()), "trusted_header"));
    assert_eq!(who(gw, &[]), (Some("gateway".into()), "principal"));
    // A known principal is who it is, whatever it claims.
    assert_eq!(
        who(Some("spiffe://t/mailer"), &["crm"]),
        (Some("mailer".into()), "principal")
    );
    // An unknown principal is unknown: never upgraded by its own claim.
    assert_eq!(who(stranger, &["crm"]), (None, "none"));
    assert_eq!(who(stranger, &[]), (None, "none"));
    // Without a principal the header counts only where the policy opts in.
    assert_eq!(who(None, &["crm"]), (None, "none"));
    // A repeated header, or one naming nobody, names nobody: not the gateway itself.
    assert_eq!(who(gw, &["crm", "crm"]), (None, "none"));
    assert_eq!(who(gw, &["crm", "mailer"]), (None, "none"));
    assert_eq!(who(gw, &["nobody"]), (None, "none"));

    let plain = compile(&policy_json(json!({
        "identity": { "caller_header": { "name": "x-caller", "trust_plaintext": true } }
    })));
    let party = plain.identify_caller(None, Some("crm"));
    assert_eq!(party.source, IdentitySource::PlaintextHeader);
    assert_eq!(party.service.map(|s| plain.service_name(s)), Some("crm"));
    // trust_plaintext does not extend to principals it does not know.
    assert_eq!(plain.identify_caller(stranger, Some("crm")).service, None);
}

#[test]
fn the_caller_header_is_read_from_every_instance_and_spelling() {
    let p = mesh_policy();
    let gw = Some("spiffe://t/gateway");
    let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let name = |party: Party| party.service.map(|s| p.service_name(s).to_string());
    assert_eq!(
        name(p.identify_caller_in(gw, &h(&[("x-caller", "crm")]))),
        Some("crm".into())
    );
    assert_eq!(
        name(p.identify_caller_in(gw, &h(&[("x_caller", "crm")]))),
        Some("crm".into())
    );
    // Two spellings are two claims: nobody.
    let two = h(&[("x-caller", "crm"), ("x_caller", "mailer")]);
    assert_eq!(p.identify_caller_in(gw, &two).source, IdentitySource::None);
    assert_eq!(
        name(p.identify_caller_in(gw, &h(&[("x-other", "crm")]))),
        Some("gateway".into())
    );
}

#[test]
fn a_stranger_claiming_a_service_gets_what_an_unknown_caller_gets() {
    let p = mesh_policy();
    let caller = p.identify_caller(Some("spiffe://t/ns/elsewhere/sa/stranger"), Some("crm"));
    let ex = p.exchange(
        Some("r".into()),
        "GET",
        "/v1/customers",
        caller,
        p.identify_upstream(Some("crm"), None),
        &[("x-caller".into(), "crm".into())],
    );
    let r = run_with(
        &p,
        &ex,
        Direction::Response,
        &batch(json!([one_customer()])),
        &StoreAnswers::new(),
    );
    let rec = &r.out["customers"][0];
    assert!(
        rec.get("email").is_none() && rec["name"] == "[redacted]",
        "{rec}"
    );
    assert_eq!(r.log.caller_identity, "none");
    assert!(r.log.caller.contains("stranger"), "{}", r.log.caller);
    let gw = p.identify_caller(Some("spiffe://t/gateway"), Some("crm"));
    let ex = p.exchange(
        None,
        "GET",
        "/v1/customers",
        gw,
        p.identify_upstream(Some("crm"), None),
        &[],
    );
    let log = p.decision_log(&ex, Direction::Response, &Report::default(), None, 0);
    assert_eq!(
        (log.caller.as_str(), log.caller_identity),
        ("crm", "trusted_header")
    );
}

#[test]
fn a_caller_header_must_say_who_may_send_it() {
    let errors = |identity: Value| {
        let v = policy_json(json!({ "identity": identity }));
        match Policy::compile(v.to_string().as_bytes(), &super::tests::env) {
            Ok(_) => Vec::new(),
            Err(e) => {
                e.0.into_iter()
                    .map(|e| format!("{}: {}", e.pointer, e.message))
                    .collect()
            }
        }
    };
    let old = errors(json!({ "caller_header": "x-caller" }));
    assert!(
        old.len() == 1 && old[0].contains("is an object now") && old[0].contains("trusted_from"),
        "{old:?}"
    );
    let none = errors(json!({ "caller_header": { "name": "x-caller" } }));
    assert!(
        none.len() == 1 && none[0].starts_with("/identity/caller_header/trusted_from:"),
        "{none:?}"
    );
    let unknown =
        errors(json!({ "caller_header": { "name": "x-caller", "trusted_from": ["edge"] } }));
    assert!(
        unknown.len() == 1 && unknown[0].starts_with("/identity/caller_header/trusted_from/0:"),
        "{unknown:?}"
    );
    // Trust goes to an mTLS identity: a service without principals cannot hold it.
    let stats =
        errors(json!({ "caller_header": { "name": "x-caller", "trusted_from": ["stats"] } }));
    assert!(
        stats.len() == 1 && stats[0].contains("no principals"),
        "{stats:?}"
    );
    let typo = errors(json!({ "caller_header": { "name": "x-caller", "trusted": ["gateway"] } }));
    assert!(
        typo.len() == 1 && typo[0].contains("unknown field `trusted`"),
        "{typo:?}"
    );
}

fn plan_error(p: &Policy, d: Direction, body: &str) -> Option<Uninspectable> {
    let ex = exchange(p, "crm", "stats", "/v1/customers", &[]);
    p.plan_body(&ex, d, Some("application/json"), None, body.as_bytes())
        .err()
}

#[test]
fn a_body_of_another_shape_is_refused() {
    let p = policy();
    let rec = one_customer().to_string();
    for body in [
        format!(r#"{{"items":[{rec}]}}"#),
        format!(r#"{{"data":{{"customers":[{rec}]}}}}"#),
        format!("[{rec}]"),
        rec.clone(),
        r#"{"customers":["ann@example.com"]}"#.to_string(),
        format!(r#"{{"customers":[[{rec}]]}}"#),
        format!(r#"{{"customers":[{rec},"ann@example.com"]}}"#),
        r#""ann@example.com""#.to_string(),
        r#"{"customers":"ann@example.com"}"#.to_string(),
        "42".to_string(),
    ] {
        for d in [Direction::Request, Direction::Response] {
            let e = plan_error(&p, d, &body).unwrap_or_else(|| panic!("{body} passed"));
            assert_eq!(e.kind, UninspectableKind::ShapeMismatch, "{body}");
            assert_eq!(e.code(), "shape_mismatch");
            assert!(!e.tolerated);
            assert!(
                !e.detail.contains("ann@"),
                "no value in the detail: {}",
                e.detail
            );
            assert_eq!(e.status(d), if d == Direction::Request { 400 } else { 502 });
        }
    }
    // Empty batches, and bodies that hold nothing at all, are not another shape.
    for body in [
        r#"{"customers":[]}"#,
        r#"{"customers":[],"page":3}"#,
        r#"{"customers":{}}"#,
        r#"{"customers":null}"#,
        r#"{"customers":[null]}"#,
        r#"{"customers":[{}]}"#,
        "{}",
        "[]",
        "null",
    ] {
        assert_eq!(plan_error(&p, Direction::Request, body), None, "{body}");
    }
}

#[test]
fn an_empty_batch_is_told_from_another_shape_at_any_depth() {
    let mut v = policy_json(json!({}));
    v["messages"][0]["records"] = json!("$.groups[*].customers[*]");
    let p = compile(&v);
    for ok in [
        r#"{"groups":[]}"#,
        r#"{"groups":[{"customers":[]}]}"#,
        r#"{"groups":[{"customers":[]},{"customers":[]}]}"#,
        r#"{"groups":[{"customers":[{"email":"a@b.c"}]}]}"#,
    ] {
        assert_eq!(plan_error(&p, Direction::Request, ok), None, "{ok}");
    }
    for bad in [
        r#"{"groups":[{"members":[{"email":"a@b.c"}]}]}"#,
        r#"{"groups":[{"customers":[]},{"members":[{"email":"a@b.c"}]}]}"#,
        r#"{"teams":[]}"#,
    ] {
        let e = plan_error(&p, Direction::Request, bad).map(|e| e.kind);
        assert_eq!(e, Some(UninspectableKind::ShapeMismatch), "{bad}");
    }
}

#[test]
fn a_binding_may_let_another_shape_pass_logged_and_unenforced() {
    let mut v = policy_json(json!({}));
    v["messages"][0]["shape_mismatch"] = json!("pass");
    let p = compile(&v);
    let e = plan_error(&p, Direction::Request, r#"{"items":[{"email":"a@b.c"}]}"#)
        .expect("still reported");
    assert_eq!(e.kind, UninspectableKind::ShapeMismatch);
    assert!(e.tolerated);
    let ex = exchange(&p, "crm", "stats", "/v1/customers", &[]);
    let log = p.decision_log(&ex, Direction::Request, &Report::default(), Some(&e), 0);
    assert_eq!(log.outcome, Outcome::Uninspectable);
    assert!(!log.enforced && log.status.is_none());
    assert!(log
        .detail
        .unwrap_or_default()
        .starts_with("shape_mismatch: "));
    // The default refuses, and so does `fail: open` only through `fail`.
    let strict = policy();
    let ex = exchange(&strict, "crm", "stats", "/v1/customers", &[]);
    let e = plan_error(&strict, Direction::Request, r#"{"items":[]}"#).expect("refused");
    let log = strict.decision_log(&ex, Direction::Request, &Report::default(), Some(&e), 0);
    assert!(log.enforced && log.status == Some(400));
}

#[test]
fn with_undeclared_strip_a_record_of_any_kind_is_judged_not_refused() {
    let p = compile(&policy_json(json!({ "undeclared": "strip" })));
    assert_eq!(
        plan_error(
            &p,
            Direction::Request,
            r#"{"customers":["ann@example.com",[1]]}"#
        ),
        None
    );
    // The envelope still matters: data outside the records is never touched.
    assert_eq!(
        plan_error(&p, Direction::Request, r#"{"items":["ann@example.com"]}"#).map(|e| e.kind),
        Some(UninspectableKind::ShapeMismatch)
    );
}
