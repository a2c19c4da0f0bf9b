"""mode: audit changes nothing and logs what enforce would have done, so a policy can be
rolled out safely. Runs its own Envoy with the example policy switched to audit."""

from __future__ import annotations

import json

import pytest

from helpers import customers, customers_with_iban, decision, field_entry, received_json

import consentry_env as ce


@pytest.fixture(scope="module")
def audit_stack(tmp_path_factory, make_stack):
    policy = json.loads(ce.DEFAULT_POLICY.read_text())
    policy["mode"] = "audit"
    path = tmp_path_factory.mktemp("audit") / "acme-customers-audit.json"
    path.write_text(json.dumps(policy, indent=2))
    s = make_stack(policy_file=path)
    try:
        yield s
    finally:
        s.stop()


def test_audit_passes_everything_and_logs_what_enforce_would_do(audit_stack):
    s = audit_stack
    s.clear()
    batch = customers()
    r, rid = s.send("analytics", "POST", "/v1/events", caller="profile", body=batch)
    assert r.status == 200, r.text()
    assert received_json(s, "analytics") == batch
    d = decision(s, rid, "request")
    assert d["mode"] == "audit"
    assert d["outcome"] == "modified"
    email = field_entry(d, "$.customers[*].email", batch["customers"][0]["id"])
    assert (email["action"], email["reason"]) == ("strip", "no_purpose")
    assert email["n"] == len(batch["customers"]), email


def test_audit_does_not_block(audit_stack):
    s = audit_stack
    s.clear()
    batch = customers_with_iban()
    r, rid = s.send("analytics", "POST", "/v1/events", caller="profile", body=batch)
    assert r.status == 200, r.text()
    assert received_json(s, "analytics") == batch
    d = decision(s, rid, "request")
    assert (d["mode"], d["outcome"]) == ("audit", "blocked")
