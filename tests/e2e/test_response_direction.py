"""Response bodies: the recipient is the caller, identified as in a mesh by its client
certificate (stack.send(caller=...) goes over the mTLS listener with that service's
certificate, without a caller header)."""

from __future__ import annotations

import gzip
import json

import pytest

from helpers import (
    POLICY_NAME,
    REDACTED,
    assert_absent,
    assert_hashed,
    assert_intact,
    assert_marketing_view,
    assert_masked,
    assert_no_customer_values,
    check_decision_shape,
    customers,
    customers_with_iban,
    decision,
    only_request,
)


def _framing_ok(r):
    cl = r.header("content-length")
    if cl is not None:
        assert int(cl) == len(r.body), f"content-length {cl} but {len(r.body)} bytes"


def test_marketing_caller_gets_consented_customers(stack):
    batch = customers()
    r, rid = stack.send("profile", "GET", "/v1/customers", caller="marketing-email")
    assert r.status == 200, r.text()
    _framing_ok(r)
    assert only_request(stack, "profile")["method"] == "GET"
    assert_marketing_view(r.json(), batch, granted={"c-1001", "c-1003", "c-1004"})

    d = decision(stack, rid, "response")
    check_decision_shape(d)
    assert d["recipient"] == "marketing-email"
    assert d["caller"] == "marketing-email"
    assert d["outcome"] == "modified"


def test_analytics_caller_gets_pseudonymised_demographics(stack):
    batch = customers()
    r, rid = stack.send("profile", "GET", "/v1/customers?page=1&size=4", caller="analytics")
    assert r.status == 200, r.text()
    _framing_ok(r)
    got = r.json()
    for orig, rec in zip(batch["customers"], got["customers"]):
        assert_hashed(rec.get("id"), orig["id"])
        assert rec.get("name") == REDACTED
        assert_masked(rec.get("phone"), orig["phone"])
        assert_absent(rec, ("email", "address", "tax_id"), " for analytics")
        assert_intact(rec, orig, ("birth_year", "country", "page_views"))
    d = decision(stack, rid, "response")
    assert d["recipient"] == "analytics"


def test_support_caller_gets_contact_data(stack):
    batch = customers()
    r, _ = stack.send("profile", "GET", "/v1/customers", caller="support")
    assert r.status == 200, r.text()
    for orig, rec in zip(batch["customers"], r.json()["customers"]):
        assert_intact(rec, orig, ("id", "name", "email", "phone", "address"))


# (client certificate, caller header): nobody the policy knows.
UNIDENTIFIED = [
    (None, None),                 # plain HTTP, no header
    (None, "nobody-we-know"),     # plain HTTP, a header naming no service of the policy
    ("stranger", None),           # a certificate whose SPIFFE id the policy does not know
]


@pytest.mark.parametrize("caller,caller_header", UNIDENTIFIED,
                         ids=["plain", "plain-header-naming-nobody", "unknown-principal"])
def test_unidentified_caller_gets_no_customer_data(stack, caller, caller_header):
    batch = customers()
    r, rid = stack.send("profile", "GET", "/v1/customers", caller=caller,
                        caller_header=caller_header)
    assert r.status == 200, r.text()
    _framing_ok(r)
    assert_no_customer_values(r.text(), batch, "a response to an unidentified caller")
    for orig, rec in zip(batch["customers"], r.json()["customers"]):
        for k in ("birth_year", "country", "page_views", "address"):
            assert k not in rec or rec[k] != orig[k], f"{k} reached an unidentified caller"
    d = decision(stack, rid, "response")
    check_decision_shape(d)
    assert d["decisions"] and all(g["action"] != "allow" for g in d["decisions"]), d["decisions"]


def test_response_block(stack):
    batch = customers_with_iban()
    stack.services.upstreams["profile"].respond(
        "/v1/customers", 200, {"content-type": "application/json"}, json.dumps(batch))
    r, rid = stack.send("profile", "GET", "/v1/customers", caller="analytics")
    assert r.status == 403, r.text()
    assert r.header("content-type", "").startswith("application/json")
    body = r.json()
    assert body["error"] == "consentry_blocked"
    assert body["policy"] == POLICY_NAME
    assert "user.financial.bank_account" in body["categories"]
    assert body["direction"] == "response"
    assert body["request_id"] == rid
    assert_no_customer_values(r.text(), batch, "the block response")
    d = decision(stack, rid, "response")
    assert d["outcome"] == "blocked"


def test_json_with_charset_is_inspected(stack):
    batch = customers()
    stack.services.upstreams["profile"].respond(
        "/v1/customers", 200, {"content-type": "application/json; charset=utf-8"},
        json.dumps(batch))
    r, _ = stack.send("profile", "GET", "/v1/customers", caller="marketing-email")
    assert r.status == 200, r.text()
    assert_marketing_view(r.json(), batch, granted={"c-1001", "c-1003", "c-1004"})


def _gzip_json(batch):
    return gzip.compress(json.dumps(batch).encode())


RESPONSE_CASES = [
    ("malformed", {"content-type": "application/json"}, b'{"customers": [{"id": "c-1001", '),
    ("non_json_type", {"content-type": "text/plain"},
     json.dumps(customers()).encode()),
    ("brotli", {"content-type": "application/json", "content-encoding": "br"},
     b"\x1b\x03\x00\xf8\x8d\x94n\xde\x08"),
]


@pytest.mark.parametrize("case,headers,body", RESPONSE_CASES,
                         ids=[c[0] for c in RESPONSE_CASES])
def test_uninspectable_response_is_refused(stack, case, headers, body):
    stack.services.upstreams["profile"].respond("/v1/customers", 200, headers, body)
    r, rid = stack.send("profile", "GET", "/v1/customers", caller="marketing-email")
    assert r.status == 502, f"{case}: {r.status} {r.text()[:300]}"
    assert r.json()["error"] == "consentry_uninspectable"
    assert isinstance(r.json().get("reason"), str) and r.json()["reason"]
    assert_no_customer_values(r.text(), customers(), "the refusal")
    d = decision(stack, rid, "response")
    assert d["outcome"] == "uninspectable"
    assert d.get("detail"), d


def test_gzip_response_is_judged_and_sent_back_gzip(stack):
    batch = customers()
    stack.services.upstreams["profile"].respond(
        "/v1/customers", 200, {"content-type": "application/json", "content-encoding": "gzip"},
        _gzip_json(batch))
    r, rid = stack.send("profile", "GET", "/v1/customers", caller="marketing-email",
                        headers={"accept-encoding": "gzip"})
    assert r.status == 200, r.text()[:300]
    assert r.header("content-encoding") == "gzip", r.headers
    got = json.loads(gzip.decompress(r.body))
    assert_marketing_view(got, batch, granted={"c-1001", "c-1003", "c-1004"})
    assert decision(stack, rid, "response")["outcome"] == "modified"
