"""No way around the policy, in real Envoy: other spellings of a covered path, query
parameter or header, another envelope, and a claimed identity never get customer data
past the filter.

Every case runs against three configurations:

* `hygiene`: the shipped bootstrap, with Envoy's own path normalisation on
  (`normalize_path`, `merge_slashes`, `path_with_escaped_slashes_action: REJECT_REQUEST`);
* `raw`: the same bootstrap without it, where Envoy forwards every spelling unchanged and
  the filter's own canonicalisation (plugin/src/engine/route.rs) must hold alone;
* `exempt`: the shipped bootstrap with its route table generated from the policy
  (`Stack(exempt_uncovered=True)`), where requests no binding can cover skip the filter
  on their route: the skip must never become a way around the policy.

The rule checked for each request is the one that matters to a regulator: the recipient
either receives the message with the protected values removed, or receives nothing and
the client gets a 400 with a reason. Never the e-mail address in clear.
"""

from __future__ import annotations

import json
import time
import urllib.parse

import pytest

import consentry_env as ce
from helpers import (
    check_decision_shape,
    customers,
    decision,
    fresh_id,
    record,
)


def _variant(make_stack, **kwargs):
    """A stack rendered another way, for the module, stopped after it."""
    s = make_stack(**kwargs)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def raw_stack(make_stack):
    yield from _variant(make_stack, path_hygiene=False)


@pytest.fixture(scope="module")
def exempt_stack(make_stack):
    yield from _variant(make_stack, exempt_uncovered=True)


@pytest.fixture(params=["hygiene", "raw", "exempt"])
def any_stack(request, stack, raw_stack, exempt_stack):
    s = {"hygiene": stack, "raw": raw_stack, "exempt": exempt_stack}[request.param]
    s.clear()
    return s


def _batch():
    """Two customers no other test used, and the values analytics may not see."""
    recs = [record(fresh_id()), record(fresh_id())]
    protected = [r["email"] for r in recs] + [r["id"] for r in recs] + [r["name"] for r in recs]
    return {"customers": recs}, protected


def _encodings(value: str) -> list[str]:
    return [value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)]


def _leaks(stack, service: str, protected: list[str]) -> list[str]:
    """Protected values (in any URL encoding) in anything `service` received."""
    seen = json.dumps(stack.recorded(service))
    return [v for p in protected for v in _encodings(p) if v in seen]


# Spellings of POST /v1/events (covered by `customer-batch`; analytics may have no e-mail,
# name or raw id). Each is forwarded to analytics with those removed, or refused.
EQUIVALENT = [
    "/v1/events",
    "/v1/events/",
    "//v1/events",
    "/v1//events",
    "/v1/./events",
    "/v1/x/../events",
    "/v1/x/%2e%2E/events",
    "/v1/%65vents",
    "/%76%31/events",
    "/V1/EVENTS",
    "/v1/Events",
    "/v1/events;jsessionid=1",
    "/v1;v=2/events",
    "/v1/x/..;/events",
    "/v1/events%3Bx",
    "/v1/events/batch/1",
    "/v1/events?page=1",
    "/v1/events;x?y=1;z=2",
]
# Spellings no single safe reading of exists: refused (by Envoy with its hygiene, by the
# filter without), never forwarded.
UNSAFE = [
    "/v1%2Fevents",
    "/v1%2fevents",
    "/v1%5Cevents",
    "/v1/events%2F1",
    "/v1/events%zz",
    "/v1/events/%",
    "/v1/%u0065vents",
    "/v1/events%00.json",
    "/v1/events%3Femail=ann%40example.com",
    "/../v1/events",
    "/v1\\events",
    "/v1/events#frag",
]
# What Envoy's own normalisation (the `hygiene` configuration) makes of some of them
# before any filter runs (measured; see harness/src/envoy_path.rs).
ENVOY_REWRITES = {"/v1\\events": "/v1/events", "/../v1/events": "/v1/events"}


@pytest.mark.parametrize("path", EQUIVALENT)
def test_an_equivalent_spelling_is_enforced(any_stack, path):
    batch, protected = _batch()
    r, rid = any_stack.send("analytics", "POST", path, caller="profile", body=batch)
    assert r.status == 200, f"{path}: {r.status} {r.text()[:300]}"
    rec = any_stack.recorded("analytics")
    assert len(rec) == 1, rec
    assert not _leaks(any_stack, "analytics", protected), f"{path} leaked to analytics"
    got = json.loads(rec[0]["body"])
    assert len(got["customers"]) == 2 and all("email" not in c for c in got["customers"])
    d = decision(any_stack, rid, "request")
    check_decision_shape(d)
    assert d["binding"] == "customer-batch" and d["outcome"] == "modified", d
    assert d["path"].lower() in ("/v1/events", "/v1/events/…"), d["path"]


@pytest.mark.parametrize("path", UNSAFE)
def test_an_unsafe_spelling_is_refused_not_forwarded(any_stack, path):
    batch, protected = _batch()
    if path in ENVOY_REWRITES and any_stack.path_hygiene:
        # Envoy's normalisation reads these one way (a raw backslash as `/`, a `..` above
        # the root dropped) and forwards the canonical route, which is judged as such.
        r, _ = any_stack.send("analytics", "POST", path, caller="profile", body=batch)
        assert r.status == 200 and not _leaks(any_stack, "analytics", protected)
        assert any_stack.recorded("analytics")[0]["path"] == ENVOY_REWRITES[path]
        return
    r, rid = any_stack.send("analytics", "POST", path, caller="profile", body=batch)
    assert r.status == 400, f"{path}: {r.status} {r.text()[:300]}"
    assert any_stack.recorded("analytics") == [], f"{path} reached analytics"
    if r.header("x-consentry") == "refused":
        # Refused by the filter: a JSON reason, and the refusal is logged.
        assert r.json()["reason"] == "unsafe_path", r.text()
        d = decision(any_stack, rid, "request")
        assert d["outcome"] == "uninspectable" and d["status"] == 400, d
        assert d["detail"].startswith("unsafe_path: "), d
    else:
        # Refused by Envoy itself, before any filter: only with its hygiene on, or for
        # a fragment (which Envoy never forwards).
        assert any_stack.path_hygiene or "#" in path, \
            f"{path}: 400 without the filter's refusal on the raw configuration: {r.text()}"


def test_without_envoys_hygiene_the_filter_refuses_what_envoy_would(raw_stack):
    """The raw configuration really forwards spellings unchanged: the filter alone holds."""
    raw_stack.clear()
    batch, _ = _batch()
    r, _ = raw_stack.send("analytics", "POST", "//v1/./events", caller="profile", body=batch)
    assert r.status == 200
    assert raw_stack.recorded("analytics")[0]["path"] == "//v1/./events"
    assert "email" not in raw_stack.recorded("analytics")[0]["body"]


QUERY_SPELLINGS = [
    "email={v}",
    "EMAIL={v}",
    "Email={v}&page=2",
    "email[]={v}",
    "email%5B0%5D={v}",
    "email[work]={v}",
    "e%6Dail={v}",
    "page=1;email={v}",
    "email={v}&email={v}",
    "x=1&&email={v}",
]


@pytest.mark.parametrize("query", QUERY_SPELLINGS)
def test_a_query_parameter_in_any_spelling_is_redacted(any_stack, query):
    value = f"{fresh_id()}@example.test"
    path = "/v1/events?" + query.format(v=urllib.parse.quote(value, safe=""))
    r, rid = any_stack.send("analytics", "GET", path, caller="profile",
                            headers={"x-customer-id": fresh_id()})
    assert r.status == 200, r.text()
    assert not _leaks(any_stack, "analytics", [value]), f"?{query} leaked"
    got = any_stack.recorded("analytics")[0]["path"]
    assert "%5Bredacted%5D" in got, got
    d = decision(any_stack, rid, "request")
    assert d["decisions"] and all(g["paths"] == ["query:email"] and g["action"] == "redact"
                                  for g in d["decisions"]), d


def test_a_bound_header_in_any_spelling_and_every_instance_is_stripped(any_stack):
    values = [f"{fresh_id()}@example.test" for _ in range(3)]
    hdrs = [("x-customer-email", values[0]), ("X-Customer-Email", values[1]),
            ("x_customer_email", values[2]), ("x-customer-id", fresh_id())]
    r, rid = any_stack.send("analytics", "GET", "/v1/events", caller="profile", headers=hdrs)
    assert r.status == 200, r.text()
    assert not _leaks(any_stack, "analytics", values), "a spelling of x-customer-email leaked"
    d = decision(any_stack, rid, "request")
    # One decision for the header, whatever its spellings and instances.
    assert [(g["action"], g["n"]) for g in d["decisions"]
            if "header:x-customer-email" in g["paths"]] == [("strip", 1)], d


def test_the_consent_header_is_removed_in_every_spelling(any_stack):
    """The filter reads `x_consentry_consent` as the consent header, so it removes it too:
    it names subjects, and no upstream has a purpose for it."""
    batch, _ = _batch()
    hdrs = [("x-consentry-consent", "c-1=marketing_email"), ("x_consentry_consent", "c-2=")]
    r, _ = any_stack.send("analytics", "POST", "/v1/events", caller="profile", body=batch,
                          headers=hdrs)
    assert r.status == 200, r.text()
    got = {k.lower() for k, _ in any_stack.recorded("analytics")[0]["headers"]}
    assert not got & {"x-consentry-consent", "x_consentry_consent"}, got


ENVELOPES = {
    "renamed": lambda rec: {"items": [rec]},
    "nested": lambda rec: {"data": {"customers": [rec]}},
    "top-level array": lambda rec: [rec],
    "bare record": lambda rec: rec,
    "list of strings": lambda rec: {"customers": [rec["email"]]},
}


@pytest.mark.parametrize("shape", list(ENVELOPES))
def test_another_envelope_is_refused_not_passed(any_stack, shape):
    rec = record(fresh_id())
    r, rid = any_stack.send("analytics", "POST", "/v1/events", caller="profile",
                            body=ENVELOPES[shape](rec))
    assert r.status == 400, f"{shape}: {r.status} {r.text()[:300]}"
    assert r.json()["reason"] == "shape_mismatch", r.text()
    assert rec["email"] not in r.text()
    assert any_stack.recorded("analytics") == [], f"a {shape} body reached analytics"
    d = decision(any_stack, rid, "request")
    assert d["outcome"] == "uninspectable" and d["detail"].startswith("shape_mismatch: "), d
    assert rec["email"] not in json.dumps(d)


def test_an_empty_batch_still_passes(any_stack):
    r, _ = any_stack.send("analytics", "POST", "/v1/events", caller="profile",
                          body={"customers": []})
    assert r.status == 200, r.text()
    assert json.loads(any_stack.recorded("analytics")[0]["body"]) == {"customers": []}


@pytest.mark.parametrize("path", ["//v1/./customers", "/V1/Customers", "/v1/customers;x=1",
                                  "/v1/x/../customers"])
def test_a_response_to_an_equivalent_spelling_is_judged(any_stack, path):
    """The response's binding is chosen from the same canonical path. (profile answers
    the customer batch to whatever spelling reaches it, as a lenient framework would.)"""
    any_stack.services.upstreams["profile"].respond(
        "*", 200, {"content-type": "application/json"}, json.dumps(customers()))
    r, rid = any_stack.send("profile", "GET", path, caller="analytics")
    assert r.status == 200, r.text()
    body = r.text()
    for c in customers()["customers"]:
        assert c["email"] not in body and c["name"] not in body, f"{path}: {c['id']} leaked"
    d = decision(any_stack, rid, "response")
    assert d["binding"] == "customer-reads" and d["recipient"] == "analytics", d


# -- identity: a caller cannot claim to be another ---------------------------------------

def _emails_in(text: str) -> list[str]:
    return [c["email"] for c in customers()["customers"] if c["email"] in text]


def test_a_stranger_claiming_to_be_profile_gets_no_email(stack):
    """A valid mesh certificate the policy does not know, plus `x-consentry-caller:
    profile`: the unknown caller's view (no e-mail), not profile's (every e-mail)."""
    r, rid = stack.send_mtls("stranger", "profile", "GET", "/v1/customers",
                             caller_header="profile")
    assert r.status == 200, r.text()
    assert _emails_in(r.text()) == [], "the stranger received e-mail addresses"
    d = decision(stack, rid, "response")
    assert d["caller_identity"] == "none" and d["recipient"].startswith("unknown("), d
    # The same request from profile's own certificate gets every e-mail: the claim
    # is what made no difference.
    r, rid = stack.send("profile", "GET", "/v1/customers", caller="profile")
    assert len(_emails_in(r.text())) == len(customers()["customers"])


def test_a_plaintext_caller_header_is_not_trusted(stack):
    r, rid = stack.send("profile", "GET", "/v1/customers", caller_header="profile")
    assert r.status == 200, r.text()
    assert _emails_in(r.text()) == []
    d = decision(stack, rid, "response")
    assert d["caller_identity"] == "none", d


def test_the_gateway_may_name_the_caller_it_calls_for(stack):
    """The gateway's principal is in `trusted_from`: its header names the caller."""
    r, rid = stack.send_mtls("gateway", "profile", "GET", "/v1/customers",
                             caller_header="analytics")
    assert r.status == 200, r.text()
    assert _emails_in(r.text()) == [], "analytics may have no e-mail"
    d = decision(stack, rid, "response")
    assert (d["caller"], d["caller_identity"]) == ("analytics", "trusted_header"), d
    # Repeated, the claim names nobody (not the gateway, which may see everything).
    r, rid = stack.send_mtls("gateway", "profile", "GET", "/v1/customers",
                             headers=[(ce.CALLER_HEADER, "analytics"),
                                      (ce.CALLER_HEADER, "profile")])
    assert _emails_in(r.text()) == []
    assert decision(stack, rid, "response")["caller_identity"] == "none"


def test_a_known_principal_is_named_by_its_principal(stack):
    r, rid = stack.send("profile", "GET", "/v1/customers", caller="marketing-email")
    d = decision(stack, rid, "response")
    assert (d["caller"], d["caller_identity"]) == ("marketing-email", "principal"), d


# -- routes no binding covers skip the VM (exempt configuration) ------------------------

UNCOVERED = "wasmcustom.consentry.uncovered"


def _uncovered_count(stack) -> int:
    return stack.stats(UNCOVERED).get(UNCOVERED, 0)


@pytest.mark.parametrize("path", ["/v1/metrics", "/static/app.js", "/", "/v2/customers/42",
                                  "/V1/Metrics/"])
def test_a_route_no_binding_covers_never_enters_the_vm(exempt_stack, stack, path):
    """In the generated route table the request skips the filter (the VM counts nothing);
    in the plain bootstrap the same request enters it and is recognised as uncovered."""
    for s, enters in ((exempt_stack, False), (stack, True)):
        s.clear()
        before = _uncovered_count(s)
        r, _ = s.send("analytics", "GET", path, caller="profile",
                      headers={"x-consentry-consent": "c-1001=marketing_email"})
        assert r.status == 200, r.text()
        rec = s.recorded("analytics")
        assert len(rec) == 1 and rec[0]["path"] == path, rec
        # The consent header never reaches an upstream: the filter removes it, and on an
        # exempt route the route does.
        assert not any(k.lower() == "x-consentry-consent" for k, _ in rec[0]["headers"]), rec
        deadline = time.monotonic() + 2
        while enters and _uncovered_count(s) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (_uncovered_count(s) > before) == enters, \
            f"{path}: VM entered={_uncovered_count(s) > before}, expected {enters}"


@pytest.mark.parametrize("path", ["/v1/metrics;x=1", "/v1/a%20b", "/.well-known/x",
                                  "/v1/customersx", "/V1/EVENTSX/1"])
def test_a_path_the_route_table_cannot_judge_falls_into_the_filter(exempt_stack, path):
    """Still not plainly canonical after Envoy's normalisation (a `;` parameter, an escape
    Envoy keeps, a dot segment), or starting with a covered prefix as a string (the route
    table compares more than segment-wise): the exemption does not match, the filter
    decides (here: uncovered, so it passes), never the route."""
    exempt_stack.clear()
    before = _uncovered_count(exempt_stack)
    r, _ = exempt_stack.send("analytics", "GET", path, caller="profile")
    assert r.status == 200, r.text()
    deadline = time.monotonic() + 2
    while _uncovered_count(exempt_stack) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _uncovered_count(exempt_stack) > before, f"{path} skipped the filter"


def test_a_policy_that_covers_every_path_exempts_nothing():
    policy = json.loads(ce.DEFAULT_POLICY.read_text())
    assert ce.uncovered_route_exemption(policy)[0] == [
        "/v1/customers", "/v1/campaigns", "/v1/invoices", "/v1/events", "/v1/enrich",
        "/v1/tickets"]
    policy["messages"].append({"name": "all", "fields": [
        {"path": "$.email", "category": "user.contact.email"}]})
    prefixes, why = ce.uncovered_route_exemption(policy)
    assert prefixes is None and "covers every request" in why
    policy["messages"][-1]["paths"] = ["/v1//x"]
    assert ce.uncovered_route_exemption(policy)[0] is None
