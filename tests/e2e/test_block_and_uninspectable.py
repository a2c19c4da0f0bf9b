"""Messages refused whole: `block` bindings, and request bodies the filter cannot inspect
(fail: closed). In every case the upstream receives nothing."""

from __future__ import annotations

import base64
import gzip
import json

import pytest

from helpers import (
    only_request,
    POLICY_NAME,
    assert_no_customer_values,
    check_decision_shape,
    customers,
    customers_with_iban,
    decision,
    field_entry,
    record,
)


@pytest.mark.parametrize("service,path", [
    ("analytics", "/v1/events"),
    ("marketing", "/v1/campaigns"),
    ("support", "/v1/tickets"),
    ("unknown", "/v1/customers"),
])
def test_bank_account_to_a_service_without_financial_purpose_is_blocked(stack, service, path):
    batch = customers_with_iban()
    r, rid = stack.send(service, "POST", path, caller="profile", body=batch)
    assert r.status == 403, r.text()
    assert r.header("content-type", "").startswith("application/json")
    body = r.json()
    assert body["error"] == "consentry_blocked"
    assert body["policy"] == POLICY_NAME
    assert "user.financial.bank_account" in body["categories"]
    assert body["direction"] == "request"
    assert body["request_id"] == rid
    assert_no_customer_values(r.text(), batch, "the block response")
    assert stack.recorded(service) == [], f"{service} received a blocked message"

    d = decision(stack, rid, "request")
    check_decision_shape(d)
    assert d["outcome"] == "blocked"
    iban = field_entry(d, "$.customers[*].iban", batch["customers"][0]["id"])
    assert (iban["category"], iban["action"]) == ("user.financial.bank_account", "block")
    assert iban["reason"] == "no_purpose"


def _big_batch(size: int) -> bytes:
    pad = "x" * size
    return json.dumps({"customers": [record("c-5001", padding=pad)]}).encode()


REQUEST_CASES = [
    ("malformed_json", {"content-type": "application/json"},
     b'{"customers": [{"id": "c-1001", "email": "alice.keller@example.com"', 400),
    ("non_json_content_type", {"content-type": "text/plain"},
     json.dumps(customers()).encode(), 415),
    ("no_content_type", {}, json.dumps(customers()).encode(), 415),
    ("brotli_encoding", {"content-type": "application/json", "content-encoding": "br"},
     b"\x1b\x03\x00\xf8\x8d\x94n\xde\x08", 415),
    ("gzip_that_is_not_gzip", {"content-type": "application/json", "content-encoding": "gzip"},
     json.dumps(customers()).encode(), 400),
    ("over_size_limit", {"content-type": "application/json"},
     _big_batch(1_500_000), 413),
]


@pytest.mark.parametrize("case,headers,body,status", REQUEST_CASES,
                         ids=[c[0] for c in REQUEST_CASES])
def test_uninspectable_request_is_refused(stack, case, headers, body, status):
    r, rid = stack.send("analytics", "POST", "/v1/events", caller="profile", body=body,
                        headers=headers, timeout=20)
    assert r.status == status, f"{case}: {r.status} {r.text()[:300]}"
    assert r.header("content-type", "").startswith("application/json"), r.headers
    err = r.json()
    assert err["error"] == "consentry_uninspectable"
    assert isinstance(err.get("reason"), str) and err["reason"]
    assert_no_customer_values(r.text(), customers(), "the refusal")
    assert stack.recorded("analytics") == [], "the upstream received an uninspected body"
    d = decision(stack, rid, "request")
    check_decision_shape(d)
    assert d["outcome"] == "uninspectable"
    assert d.get("detail"), d


def test_body_just_under_the_limit_is_inspected(stack):
    body = _big_batch(1_000_000)
    assert len(body) < 1048576
    r, _ = stack.send("analytics", "POST", "/v1/events", caller="profile", body=body,
                      headers={"content-type": "application/json"}, timeout=20)
    assert r.status == 200, r.text()[:300]
    got = json.loads(stack.recorded("analytics")[0]["body"])
    assert "email" not in got["customers"][0]
    assert len(got["customers"][0]["padding"]) == 1_000_000


def test_gzip_request_is_judged_and_forwarded_gzip(stack):
    """gzip (and deflate) bodies are decoded, judged, and sent on encoded the same way."""
    batch = customers()
    body = gzip.compress(json.dumps(batch).encode())
    r, rid = stack.send("analytics", "POST", "/v1/events", caller="profile", body=body,
                        headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status == 200, r.text()[:300]
    rec = only_request(stack, "analytics")
    encodings = [v for k, v in rec["headers"] if k.lower() == "content-encoding"]
    assert encodings == ["gzip"], rec["headers"]
    got = json.loads(gzip.decompress(base64.b64decode(rec["body_b64"])))
    for orig, out in zip(batch["customers"], got["customers"]):
        assert "email" not in out
        assert out["birth_year"] == orig["birth_year"]
    assert decision(stack, rid, "request")["outcome"] == "modified"
