"""Messages whose recipient may receive every category of their route, whatever the
subjects' consent, are decided from their headers: the body is neither buffered nor
parsed and reaches the recipient byte for byte. Like a covered message that held no
declared data, such a message is logged only with `log.untouched`; its entry then says
`inspected: false` and gives the purpose and legal basis of each category. In the
example policy the profile service (essential.account, contract, allows `user`) is such
a recipient. `log.every_field` turns this off for teams that want every field and
subject pseudonym listed."""

from __future__ import annotations

import json

import pytest

from helpers import DECLARED, customers, decision, header, only_request, pseudonym

import consentry_env as ce

ALL_CATEGORIES = [
    "user.unique_id", "user.name", "user.contact.email", "user.contact.phone_number",
    "user.contact.address", "user.demographic.age", "user.demographic.location",
    "user.financial.bank_account", "user.government_id", "user.behavior.browsing_history",
]


def _unread_entry_ok(d: dict, recipient: str):
    assert d["recipient"] == recipient
    assert d["outcome"] == "allowed"
    assert d["inspected"] is False
    assert d["decisions"] == [] and d["counts"] == {}
    assert "subjects" not in d and "records" not in d
    grants = d["allowed_categories"]
    assert [g["category"] for g in grants] == ALL_CATEGORIES
    assert all((g["purpose"], g["basis"]) == ("essential.account", "contract") for g in grants)


def _policy_stack(tmp_path_factory, make_stack, name: str, log: dict):
    policy = json.loads(ce.DEFAULT_POLICY.read_text())
    policy["log"] = log
    path = tmp_path_factory.mktemp(name) / f"acme-{name}.json"
    path.write_text(json.dumps(policy, indent=2))
    return make_stack(policy_file=path)  # mTLS: callers go by certificate


@pytest.fixture(scope="module")
def untouched_stack(tmp_path_factory, make_stack):
    s = _policy_stack(tmp_path_factory, make_stack, "untouched", {"untouched": True})
    try:
        yield s
    finally:
        s.stop()


def test_request_to_a_recipient_allowed_everything_is_not_read(stack):
    # Odd but valid spacing: any re-serialisation by the filter would normalise it.
    raw = json.dumps(customers(), indent=3).encode()
    r, rid = stack.send("profile", "POST", "/v1/customers", caller="support", body=raw,
                        headers={"content-type": "application/json"})
    assert r.status == 200, r.text()
    rec = only_request(stack, "profile")
    assert rec["body"].encode() == raw
    # The filter left the framing alone (it removes content-length only when it may
    # rewrite the body).
    assert header(rec, "content-length") == str(len(raw))
    # Not logged by default: the policy alone let it through.
    assert stack.decisions(rid, timeout=0.5) == []


def test_with_log_untouched_the_unread_message_is_logged_with_its_grants(untouched_stack):
    s = untouched_stack
    s.clear()
    raw = json.dumps(customers()).encode()
    r, rid = s.send("profile", "POST", "/v1/customers", caller="support", body=raw,
                    headers={"content-type": "application/json"})
    assert r.status == 200, r.text()
    assert only_request(s, "profile")["body"].encode() == raw
    _unread_entry_ok(decision(s, rid, "request"), "profile")


def test_an_unread_body_is_not_judged_at_all(stack):
    """Nothing the recipient could receive is refused, so not even malformed JSON is: the
    filter never looks. (To a recipient that may not have everything, the same body is
    refused as uninspectable: see test_block_and_uninspectable.)"""
    raw = b'{"customers": [{"id": "c-1", "email": "x@example.com"'
    r, rid = stack.send("profile", "POST", "/v1/customers", caller="support", body=raw,
                        headers={"content-type": "application/json"})
    assert r.status == 200, r.text()
    assert only_request(stack, "profile")["body"].encode() == raw
    stack.clear()
    r, rid = stack.send("analytics", "POST", "/v1/events", caller="profile", body=raw,
                        headers={"content-type": "application/json"})
    assert r.status == 400, r.text()
    assert stack.recorded("analytics") == []


def test_response_to_a_recipient_allowed_everything_passes_untouched_and_unlogged(stack):
    """Known at the request: the response goes to a caller that may have everything, so
    its headers are not even read (no hold, no content-length change, no entry)."""
    body = json.dumps(customers(), indent=3).encode()
    stack.services.upstreams["billing"].respond(
        "/v1/invoices", 200, {"content-type": "application/json"}, body)
    r, rid = stack.send("billing", "GET", "/v1/invoices", caller="profile")
    assert r.status == 200, r.text()
    assert r.body == body
    assert r.header("content-length") == str(len(body))
    assert r.header("x-consentry-hold") is None
    assert stack.decisions(rid, timeout=0.5) == []


def test_response_to_a_recipient_allowed_everything_is_not_held(untouched_stack):
    s = untouched_stack
    s.clear()
    batch = customers()
    body = json.dumps(batch).encode()
    s.services.upstreams["billing"].respond(
        "/v1/invoices", 200, {"content-type": "application/json"}, body)
    r, rid = s.send("billing", "GET", "/v1/invoices", caller="profile")
    assert r.status == 200, r.text()
    assert r.body == body
    assert r.header("x-consentry-hold") is None
    _unread_entry_ok(decision(s, rid, "response"), "profile")


@pytest.fixture(scope="module")
def every_field_stack(tmp_path_factory, make_stack):
    s = _policy_stack(tmp_path_factory, make_stack, "every-field", {"every_field": True})
    try:
        yield s
    finally:
        s.stop()


def test_every_field_reads_and_lists_each_field(every_field_stack):
    s = every_field_stack
    s.clear()
    batch = customers()
    r, rid = s.send("profile", "POST", "/v1/customers", caller="support", body=batch)
    assert r.status == 200, r.text()
    assert json.loads(only_request(s, "profile")["body"]) == batch
    d = decision(s, rid, "request")
    assert "inspected" not in d and "allowed_categories" not in d
    assert d["decisions"], d
    assert all(g["action"] == "allow" and g["basis"] == "contract" for g in d["decisions"])
    # Every declared field of every record is listed: one group per category here.
    declared = sum(1 for c in batch["customers"] for k in c if k in DECLARED)
    assert sum(g["n"] for g in d["decisions"]) == declared, d
    assert d["subjects"] == [pseudonym(s.subject_key, c["id"]) for c in batch["customers"]]
    # And a malformed body is refused again: it has to be read.
    s.clear()
    r, _ = s.send("profile", "POST", "/v1/customers", caller="support", body=b'{"customers": [',
                  headers={"content-type": "application/json"})
    assert r.status == 400, r.text()
