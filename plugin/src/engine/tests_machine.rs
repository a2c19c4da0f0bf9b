//! The exchange machine driven without a VM: a fake host plays the glue's part (serves
//! what the machine asks, applies its effects) so that chunked bodies, late, failed and
//! cached consent lookups, both directions and host failures are exercised natively.

use super::machine::{Edit, EditFailed, Effect, Env, Event, Level, Machine, Next, StoreCall};
use super::tests::{compile, policy_json};
use super::Direction::{self, Request, Response};
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// One side of the exchange as the host holds it.
#[derive(Default, Clone)]
struct Message {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Message {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
}

/// The host: messages, cache, clock, and everything the machine did to them.
#[derive(Default)]
struct Host {
    req: Message,
    resp: Message,
    principal: Option<String>,
    cluster: Option<String>,
    now: Cell<u64>,
    cache: RefCell<HashMap<String, Vec<u8>>>,
    /// What the machine asked, in order (`ReadRoute`, `ReadHeaders(..)`, ...).
    asked: Vec<String>,
    calls: Vec<StoreCall>,
    /// The host refuses to dispatch calls.
    dispatch_fails: bool,
    /// The host refuses edits of this kind (`"body"` or `"header"`).
    refuse_edit: Option<&'static str>,
    logs: Vec<(Level, String)>,
    counts: HashMap<String, usize>,
    properties: HashMap<&'static str, Vec<u8>>,
    replies: Vec<(u32, Value, bool)>,
    resumed: Vec<Direction>,
}

impl Env for Host {
    fn now_ms(&self) -> u64 {
        self.now.get()
    }

    fn cached(&self, key: &str) -> Option<Vec<u8>> {
        self.cache.borrow().get(key).cloned()
    }
}

impl Host {
    fn message(&mut self, d: Direction) -> &mut Message {
        match d {
            Request => &mut self.req,
            Response => &mut self.resp,
        }
    }

    fn edit(&mut self, d: Direction, e: &Edit) -> Result<(), String> {
        let kind = if matches!(e, Edit::ReplaceBody { .. }) {
            "body"
        } else {
            "header"
        };
        if self.refuse_edit == Some(kind) {
            return Err("BadArgument".into());
        }
        let m = self.message(d);
        match e {
            Edit::RemoveHeader(n) => m.headers.retain(|(k, _)| k != n),
            Edit::AddHeader(n, v) => m.headers.push((n.clone(), v.clone())),
            Edit::ReplaceHeader(n, v) => {
                m.headers.retain(|(k, _)| k != n);
                m.headers.push((n.clone(), v.clone()));
            }
            Edit::ReplaceBody { size, body } => {
                assert!(*size >= m.body.len(), "the whole body is replaced");
                m.body = body.clone();
            }
        }
        Ok(())
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::Log(level, line) => self.logs.push((level, line)),
            Effect::Count(name, n) => *self.counts.entry(name).or_default() += n,
            Effect::SetProperty(name, value) => {
                self.properties.insert(name, value);
            }
            Effect::CacheSet(key, value) => {
                self.cache.borrow_mut().insert(key, value);
            }
            Effect::TryEdit(d, e) => {
                let _ = self.edit(d, &e);
            }
            Effect::LocalReply {
                status,
                body,
                refused,
            } => self.replies.push((
                status,
                serde_json::from_slice(&body).expect("replies are JSON"),
                refused,
            )),
            Effect::Resume(d) => self.resumed.push(d),
        }
    }

    /// What the glue does: hands `event` to the machine and serves what it asks until
    /// it has a final answer.
    fn drive(&mut self, m: &mut Machine, event: Event) -> Next {
        let mut event = event;
        loop {
            let step = m.handle(event, self);
            for e in step.effects {
                self.apply(e);
            }
            self.asked
                .push(format!("{:?}", step.next).chars().take(24).collect());
            event = match step.next {
                Next::Continue | Next::Pause | Next::Done => return step.next,
                Next::ReadRoute => Event::Route {
                    method: self.req.header(":method").map(str::to_string),
                    path: self.req.header(":path").map(str::to_string),
                },
                Next::ReadHeaders(d) => Event::Headers {
                    direction: d,
                    headers: Ok(self.message(d).headers.clone()),
                    principal: (d == Request).then(|| self.principal.clone()).flatten(),
                    cluster: (d == Request).then(|| self.cluster.clone()).flatten(),
                },
                Next::ReadBody { direction, size } => {
                    let body = self.message(direction).body.clone();
                    let n = size.min(body.len());
                    Event::BodyRead {
                        direction,
                        body: Ok(body[..n].to_vec()),
                    }
                }
                Next::Dispatch(call) => {
                    if self.dispatch_fails {
                        Event::Dispatched(Err("BadArgument".into()))
                    } else {
                        self.calls.push(call);
                        Event::Dispatched(Ok(self.calls.len() as u32))
                    }
                }
                Next::Edit(d, edits) => {
                    let failed = edits.iter().enumerate().find_map(|(index, e)| {
                        self.edit(d, e)
                            .err()
                            .map(|status| EditFailed { index, status })
                    });
                    Event::Edited(failed.map_or(Ok(()), Err))
                }
            };
        }
    }

    /// The decision records logged so far.
    fn records(&self) -> Vec<Value> {
        self.logs
            .iter()
            .filter_map(|(_, l)| l.strip_prefix(super::LOG_PREFIX))
            .map(|j| serde_json::from_str(j).expect("records are JSON"))
            .collect()
    }
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A `POST path` from the CRM to the service behind `cluster`, carrying `body`.
fn host(cluster: &str, path: &str, extra: &[(&str, &str)], body: &Value) -> Host {
    let mut h = headers(&[
        (":method", "POST"),
        (":path", path),
        (":authority", "svc"),
        ("content-type", "application/json"),
        ("x-caller", "crm"),
        ("content-length", "1"),
    ]);
    h.extend(headers(extra));
    Host {
        req: Message {
            headers: h,
            body: body.to_string().into_bytes(),
        },
        cluster: Some(cluster.into()),
        now: Cell::new(1_000_000),
        ..Host::default()
    }
}

fn machine(patch: Value) -> Machine {
    Machine::new(Some(Rc::new(compile(&policy_json(patch)))))
}

fn arrived(d: Direction, end_of_stream: bool) -> Event {
    Event::HeadersArrived {
        direction: d,
        end_of_stream,
    }
}

/// Sends the request body in `chunks` pieces; returns each body callback's answer.
fn send_body(host: &mut Host, m: &mut Machine, d: Direction, chunks: usize) -> Vec<Next> {
    let total = host.message(d).body.len();
    (1..=chunks)
        .map(|i| {
            host.drive(
                m,
                Event::Body {
                    direction: d,
                    size: total * i / chunks,
                    end_of_stream: i == chunks,
                },
            )
        })
        .collect()
}

fn batch(customers: Value) -> Value {
    json!({ "customers": customers })
}

fn store_answer(token: u32, status: Option<&str>, body: Value) -> Event {
    Event::StoreAnswer {
        token,
        status: status.map(str::to_string),
        body: Some(body.to_string().into_bytes()),
    }
}

#[test]
fn uncovered_traffic_costs_two_header_reads_and_is_counted() {
    let mut m = machine(json!({}));
    let mut h = host(
        "mailer",
        "/health",
        &[("x-consent", "c-1:email_ok")],
        &json!({}),
    );
    assert_eq!(h.drive(&mut m, arrived(Request, false)), Next::Continue);
    assert_eq!(
        h.asked,
        ["ReadRoute", "Continue"],
        "no other header is read"
    );
    assert_eq!(h.counts.get("consentry.uncovered"), Some(&1));
    assert_eq!(h.req.header("x-consent"), None, "never for the upstream");
    assert_eq!(
        send_body(&mut h, &mut m, Request, 2),
        [Next::Continue, Next::Continue]
    );
    assert_eq!(h.drive(&mut m, arrived(Response, false)), Next::Continue);
    assert_eq!(
        h.drive(
            &mut m,
            Event::Trailers {
                direction: Response
            }
        ),
        Next::Continue
    );
    assert!(h.logs.is_empty() && h.replies.is_empty());
}

#[test]
fn a_chunked_body_is_held_to_its_end_then_judged_and_rewritten() {
    let mut m = machine(json!({}));
    let body = batch(json!([
        { "id": "c-1", "email": "a@b.c", "name": "Ann", "consents": { "email_ok": false } },
        { "id": "c-2", "email": "d@e.f", "name": "Bo", "consents": { "email_ok": true } }
    ]));
    let mut h = host("mailer", "/v1/customers", &[], &body);
    assert_eq!(h.drive(&mut m, arrived(Request, false)), Next::Continue);
    assert_eq!(
        h.req.header("content-length"),
        None,
        "the body may change size"
    );
    let answers = send_body(&mut h, &mut m, Request, 3);
    assert_eq!(answers, [Next::Pause, Next::Pause, Next::Continue]);
    let out = h.req.json();
    assert_eq!(
        out["customers"][0].get("email"),
        None,
        "no consent: stripped"
    );
    assert_eq!(
        out["customers"][0]["name"], "[redacted]",
        "the binding redacts names"
    );
    assert_eq!(out["customers"][1]["email"], "d@e.f", "consent: kept");
    assert_eq!(out["customers"][1]["name"], "Bo");
    let records = h.records();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (&records[0]["outcome"], &records[0]["direction"]),
        (&json!("modified"), &json!("request"))
    );
    assert_eq!(h.counts.get("consentry.outcome.modified"), Some(&1));
    assert_eq!(
        h.counts.get("consentry.category.user.contact.email.strip"),
        Some(&1)
    );
    let state: Value = serde_json::from_slice(&h.properties["consentry_decision"]).unwrap();
    assert_eq!(state.as_array().map(Vec::len), Some(1));
    assert_eq!(h.properties["consentry_outcome"], b"modified");
    assert!(h.calls.is_empty() && h.replies.is_empty());
}

#[test]
fn a_late_consent_answer_resumes_the_message_and_is_cached() {
    let mut m = machine(json!({}));
    let body = batch(json!([{ "id": "c-7", "email": "a@b.c" }]));
    let mut h = host("mailer", "/v1/customers", &[], &body);
    h.drive(&mut m, arrived(Request, false));
    assert_eq!(send_body(&mut h, &mut m, Request, 1), [Next::Pause]);
    assert_eq!(
        h.calls.len(),
        1,
        "one call for the subject the record does not answer"
    );
    let asked: Value = serde_json::from_slice(&h.calls[0].body).unwrap();
    assert_eq!(asked, json!({ "subjects": ["c-7"] }));
    assert_eq!(h.calls[0].cluster, "consent");
    assert_eq!(h.counts.get("consentry.consent_store.calls"), Some(&1));
    assert!(
        h.records().is_empty(),
        "nothing is decided before the answer"
    );
    // An answer to some other call is not this one's.
    let other = store_answer(99, Some("200"), json!({ "consents": {} }));
    assert_eq!(h.drive(&mut m, other), Next::Done);
    assert!(h.resumed.is_empty());
    let answer = store_answer(
        1,
        Some("200"),
        json!({ "consents": { "c-7": { "email_ok": true } } }),
    );
    assert_eq!(h.drive(&mut m, answer), Next::Done);
    assert_eq!(h.resumed, [Request], "the paused request goes on");
    assert_eq!(h.req.json(), body, "consent from the store: kept");
    assert_eq!(h.records()[0]["outcome"], "allowed");
    assert_eq!(h.cache.borrow().len(), 1);

    // The next exchange for the same subject is answered from the cache, until it expires.
    let mut m2 = machine(json!({}));
    let mut h2 = host("mailer", "/v1/customers", &[], &body);
    h2.cache = h.cache.clone();
    h2.now.set(h.now.get() + 1_000);
    h2.drive(&mut m2, arrived(Request, false));
    assert_eq!(send_body(&mut h2, &mut m2, Request, 1), [Next::Continue]);
    assert!(h2.calls.is_empty(), "answered from the cache");
    let mut m3 = machine(json!({}));
    let mut h3 = host("mailer", "/v1/customers", &[], &body);
    h3.cache = h.cache.clone();
    h3.now.set(h.now.get() + 3_600_000);
    h3.drive(&mut m3, arrived(Request, false));
    assert_eq!(send_body(&mut h3, &mut m3, Request, 1), [Next::Pause]);
    assert_eq!(h3.calls.len(), 1, "an expired answer is asked again");
}

#[test]
fn a_failed_or_missing_consent_answer_refuses_the_message() {
    let body = batch(json!([{ "id": "c-7", "email": "a@b.c" }]));
    for (status, why) in [
        (Some("503"), "consent store answered status 503"),
        (None, "consent store did not answer"),
        (Some("200"), "no `consents` object"),
    ] {
        let mut m = machine(json!({}));
        let mut h = host("mailer", "/v1/customers", &[], &body);
        h.drive(&mut m, arrived(Request, false));
        send_body(&mut h, &mut m, Request, 2);
        assert_eq!(
            h.drive(&mut m, store_answer(1, status, json!({}))),
            Next::Done
        );
        assert!(h.resumed.is_empty(), "{why}: the request stays stopped");
        let (code, reply, refused) = &h.replies[0];
        assert_eq!((*code, *refused), (503, true), "{why}");
        assert_eq!(reply["reason"], "consent_store_unavailable");
        let record = &h.records()[0];
        assert_eq!(record["outcome"], "uninspectable");
        assert!(
            record["detail"].as_str().unwrap().contains(why),
            "{why}: {record}"
        );
        assert_eq!(h.counts.get("consentry.consent_store.failures"), Some(&1));
        assert_eq!(h.req.json(), body, "nothing was rewritten");
    }
}

#[test]
fn a_call_the_host_cannot_dispatch_refuses_the_message() {
    let mut m = machine(json!({}));
    let body = batch(json!([{ "id": "c-7", "email": "a@b.c" }]));
    let mut h = host("mailer", "/v1/customers", &[], &body);
    h.dispatch_fails = true;
    h.drive(&mut m, arrived(Request, false));
    assert_eq!(send_body(&mut h, &mut m, Request, 1), [Next::Pause]);
    assert_eq!(h.replies[0].0, 503);
    let detail = h.records()[0]["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("could not call the consent store cluster `consent`"));
}

#[test]
fn a_body_that_ends_during_the_header_lookup_is_judged_when_it_answers() {
    // The mailer needs consent for the message subject (x-customer) to get X-Email.
    let mut m = machine(json!({}));
    let body = batch(json!([{ "id": "c-1", "email": "a@b.c" }]));
    let mut h = host(
        "mailer",
        "/v1/customers",
        &[("x-customer", "c-1"), ("x-email", "a@b.c")],
        &body,
    );
    assert_eq!(h.drive(&mut m, arrived(Request, false)), Next::Pause);
    assert_eq!(h.calls.len(), 1);
    // The whole body arrives while the call is in flight: held.
    assert_eq!(
        send_body(&mut h, &mut m, Request, 2),
        [Next::Pause, Next::Pause]
    );
    let answer = store_answer(
        1,
        Some("200"),
        json!({ "consents": { "c-1": { "email_ok": false } } }),
    );
    assert_eq!(h.drive(&mut m, answer), Next::Done);
    assert_eq!(h.resumed, [Request]);
    assert_eq!(h.req.header("x-email"), None, "header stripped");
    assert_eq!(
        h.req.json()["customers"][0].get("email"),
        None,
        "the body, judged with the same answer"
    );
    assert_eq!(
        h.calls.len(),
        1,
        "the body's lookup was answered by the first"
    );
    let records = h.records();
    assert_eq!(records.len(), 1, "one record for the message: {records:?}");
    assert_eq!(records[0]["outcome"], "modified");
}

#[test]
fn the_response_is_judged_for_the_caller() {
    // The mailer (by its principal) reads from the CRM; the response goes to the mailer.
    let mut m = machine(json!({}));
    let mut h = host("crm", "/v1/customers", &[], &json!({}));
    h.req.headers.retain(|(k, _)| k != "x-caller");
    h.principal = Some("spiffe://t/mailer".into());
    h.req.body.clear();
    assert_eq!(h.drive(&mut m, arrived(Request, true)), Next::Continue);
    let body = batch(json!([{ "id": "c-1", "email": "a@b.c", "consents": { "email_ok": false } }]));
    h.resp = Message {
        headers: headers(&[(":status", "200"), ("content-type", "application/json")]),
        body: body.to_string().into_bytes(),
    };
    assert_eq!(h.drive(&mut m, arrived(Response, false)), Next::Continue);
    assert_eq!(h.resp.header("x-consentry-hold"), Some("1"));
    assert_eq!(
        send_body(&mut h, &mut m, Response, 2),
        [Next::Pause, Next::Continue]
    );
    assert_eq!(h.resp.json()["customers"][0].get("email"), None);
    let records = h.records();
    let resp = records.last().unwrap();
    assert_eq!(
        (&resp["direction"], &resp["recipient"]),
        (&json!("response"), &json!("mailer"))
    );
}

#[test]
fn http2_trailers_end_the_body() {
    let mut m = machine(json!({}));
    let body = batch(json!([{ "id": "c-1", "email": "a@b.c", "consents": { "email_ok": false } }]));
    let mut h = host("mailer", "/v1/customers", &[], &body);
    h.drive(&mut m, arrived(Request, false));
    let size = h.req.body.len();
    let chunk = Event::Body {
        direction: Request,
        size,
        end_of_stream: false,
    };
    assert_eq!(h.drive(&mut m, chunk), Next::Pause);
    assert_eq!(
        h.drive(&mut m, Event::Trailers { direction: Request }),
        Next::Continue
    );
    assert_eq!(h.req.json()["customers"][0].get("email"), None);
}

#[test]
fn a_body_over_the_limit_is_refused_before_it_is_read() {
    let mut m = machine(json!({ "limits": { "max_body_bytes": 64 } }));
    let body = batch(json!([{ "id": "c-1", "email": "a@b.c", "name": "x".repeat(80) }]));
    let mut h = host("mailer", "/v1/customers", &[], &body);
    h.drive(&mut m, arrived(Request, false));
    let answers = send_body(&mut h, &mut m, Request, 4);
    assert_eq!(answers[0], Next::Pause);
    assert!(answers.iter().all(|a| *a == Next::Pause));
    assert!(!h.asked.iter().any(|a| a.starts_with("ReadBody")));
    assert_eq!(h.replies.len(), 1, "one refusal");
    assert_eq!(
        (h.replies[0].0, &h.replies[0].1["reason"]),
        (413, &json!("body_too_large"))
    );
    // The refusal is our own local reply: it flows out through the response callbacks.
    assert_eq!(h.drive(&mut m, arrived(Response, false)), Next::Continue);
    h.resp.body = b"{}".to_vec();
    assert_eq!(send_body(&mut h, &mut m, Response, 1), [Next::Continue]);
    assert_eq!(
        h.drive(
            &mut m,
            Event::Trailers {
                direction: Response
            }
        ),
        Next::Continue
    );
    assert_eq!(h.replies.len(), 1);
}

#[test]
fn a_host_that_refuses_an_edit_gets_a_refusal_not_a_pass() {
    let body = batch(json!([{ "id": "c-1", "email": "a@b.c", "consents": { "email_ok": false } }]));
    let mut m = machine(json!({}));
    let mut h = host("mailer", "/v1/customers", &[], &body);
    h.refuse_edit = Some("body");
    h.drive(&mut m, arrived(Request, false));
    assert_eq!(send_body(&mut h, &mut m, Request, 1), [Next::Pause]);
    assert_eq!(h.replies[0].0, 400);
    let detail = h.records()[0]["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("could not replace the body"), "{detail}");

    // A header edit: the query parameter `email` is redacted for the mailer.
    let mut m = machine(json!({}));
    let mut h = host(
        "mailer",
        "/v1/customers?email=a",
        &[("x-customer", "c-1")],
        &json!({}),
    );
    h.refuse_edit = Some("header");
    assert_eq!(h.drive(&mut m, arrived(Request, true)), Next::Pause);
    assert_eq!(
        h.calls.len(),
        1,
        "the mailer needs c-1's consent for the query"
    );
    let answer = store_answer(
        1,
        Some("200"),
        json!({ "consents": { "c-1": { "email_ok": false } } }),
    );
    assert_eq!(h.drive(&mut m, answer), Next::Done);
    assert_eq!(h.replies.len(), 1, "{:?}", h.logs);
    assert_eq!(h.req.header(":path"), Some("/v1/customers?email=a"));
    let detail = h.records()[0]["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("could not rewrite the query"), "{detail}");
    assert!(h.resumed.is_empty());
}

#[test]
fn without_a_policy_every_exchange_is_refused() {
    let mut m = Machine::new(None);
    let mut h = host("mailer", "/v1/customers", &[], &json!({}));
    assert_eq!(h.drive(&mut m, arrived(Request, false)), Next::Pause);
    assert_eq!(h.replies[0].0, 503);
    assert_eq!(h.replies[0].1["error"], "consentry_unconfigured");
    assert_eq!(send_body(&mut h, &mut m, Request, 1), [Next::Pause]);
    assert_eq!(h.drive(&mut m, arrived(Response, false)), Next::Continue);
    assert_eq!(send_body(&mut h, &mut m, Response, 1), [Next::Continue]);
    assert_eq!(h.replies.len(), 1);
}

#[test]
fn an_answer_the_machine_did_not_ask_for_refuses_the_exchange() {
    let mut m = machine(json!({}));
    let mut h = host("mailer", "/v1/customers", &[], &json!({}));
    let stray = Event::BodyRead {
        direction: Request,
        body: Ok(b"{}".to_vec()),
    };
    assert_eq!(h.drive(&mut m, stray), Next::Pause);
    assert_eq!(h.replies[0].0, 500);
    assert!(h
        .logs
        .iter()
        .any(|(l, s)| *l == Level::Error && s.contains("BodyRead")));
}

#[test]
fn headers_the_host_cannot_give_refuse_the_request() {
    let mut m = machine(json!({}));
    let mut h = host("mailer", "/v1/customers", &[], &json!({}));
    let step = m.handle(arrived(Request, false), &h);
    assert_eq!(step.next, Next::ReadRoute);
    let step = m.handle(
        Event::Route {
            method: Some("POST".into()),
            path: Some("/v1/customers".into()),
        },
        &h,
    );
    assert_eq!(step.next, Next::ReadHeaders(Request));
    let step = m.handle(
        Event::Headers {
            direction: Request,
            headers: Err("InternalFailure".into()),
            principal: None,
            cluster: None,
        },
        &h,
    );
    assert_eq!(step.next, Next::Pause);
    for e in step.effects {
        h.apply(e);
    }
    assert_eq!(h.replies[0].0, 400);
    assert!(h.records()[0]["detail"]
        .as_str()
        .unwrap()
        .contains("could not read headers"));
}
