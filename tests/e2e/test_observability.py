"""What the privacy team and the platform team see: decision logs in Envoy's log and in
the access log (filter state), counters in Envoy's stats, and never a customer's value."""

from __future__ import annotations

import datetime
import json

from helpers import (
    DECLARED,
    check_decision_shape,
    customers,
    customers_with_iban,
    field_entry,
    decision,
    sensitive_values,
)


def test_decision_log_reaches_the_access_log(stack):
    r, rid = stack.send("analytics", "POST", "/v1/events", caller="profile", body=customers())
    assert r.status == 200, r.text()
    d = decision(stack, rid, "request")
    check_decision_shape(d)

    entries = stack.access_entries(rid)
    assert len(entries) == 1, entries
    e = entries[0]
    assert e["response_code"] == 200
    assert e["upstream_cluster"] == "analytics"
    assert access_decision(e, "request") == d, \
        f"access log filter state differs from the log line:\n{e}\n{d}"

    # `time` is a timestamp a log pipeline can parse (RFC 3339 or epoch number).
    assert "time" in d, f"decision log lacks 'time' (keys: {sorted(d)})"
    t = d["time"]
    if isinstance(t, str):
        datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
    else:
        assert isinstance(t, (int, float)) and t > 1.6e9


def test_blocked_and_uninspectable_reach_the_access_log(stack):
    r, rid = stack.send("analytics", "POST", "/v1/events", caller="profile",
                        body=customers_with_iban())
    assert r.status == 403
    (e,) = stack.access_entries(rid)
    assert e["response_code"] == 403
    assert access_decision(e, "request")["outcome"] == "blocked"

    r, rid = stack.send("analytics", "POST", "/v1/events", caller="profile", body=b"{nope",
                        headers={"content-type": "application/json"})
    assert r.status == 400
    (e,) = stack.access_entries(rid)
    assert e["response_code"] == 400
    assert access_decision(e, "request")["outcome"] == "uninspectable"


def access_decision(entry: dict, direction: str) -> dict:
    """The decision of one direction from an access log entry's filter state, which
    holds the exchange's decision logs: one object, or a list (one per direction)."""
    v = entry.get("consentry_decision_json")
    assert v is not None, f"no parsable consentry_decision in the access log entry: {entry}"
    items = v if isinstance(v, list) else [v]
    found = [d for d in items if d.get("direction") == direction]
    assert len(found) == 1, f"expected one {direction} decision in the filter state: {v}"
    return found[0]


def _delta(before: dict, after: dict, name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


def test_counters_per_outcome(stack):
    before = stack.stats()
    r, _ = stack.send("analytics", "POST", "/v1/events", caller="profile", body=customers())
    assert r.status == 200
    r, _ = stack.send("analytics", "POST", "/v1/events", caller="profile",
                      body=customers_with_iban())
    assert r.status == 403
    r, _ = stack.send("analytics", "POST", "/v1/events", caller="profile", body=b"[",
                      headers={"content-type": "application/json"})
    assert r.status == 400
    # Only data analytics may have: read, and allowed as it is.
    r, _ = stack.send("analytics", "POST", "/v1/events", caller="profile",
                      body={"customers": [{"birth_year": 1980, "country": "NL"}]})
    assert r.status == 200
    after = stack.stats()
    p = "wasmcustom.consentry.outcome."
    assert _delta(before, after, p + "modified") == 1, after
    assert _delta(before, after, p + "blocked") == 1, after
    assert _delta(before, after, p + "uninspectable") == 1, after
    assert _delta(before, after, p + "allowed") == 1, after
    # Per-recipient and per-category counters exist (names are the filter's choice,
    # but they carry the recipient and the category).
    names = list(after)
    assert any("analytics" in n for n in names), names
    assert any("user.contact.email" in n or "user_contact_email" in n for n in names), names


def test_logs_never_hold_customer_values(stack):
    """After traffic in every direction and outcome (plus whatever ran before), neither
    Envoy's log nor the access log holds a customer's value, nor a key."""
    batch, iban = customers(), customers_with_iban()
    for service, path in [("analytics", "/v1/events"), ("marketing", "/v1/campaigns"),
                          ("billing", "/v1/invoices"), ("enrichment", "/v1/enrich"),
                          ("unknown", "/v1/customers")]:
        stack.send(service, "POST", path, caller="profile", body=batch)
        stack.send(service, "POST", path, caller="profile", body=iban)
    for caller in ("marketing-email", "analytics", None):
        r, rid = stack.send("profile", "GET", "/v1/customers", caller=caller)
    stack.send("analytics", "POST", "/v1/events", caller="profile", body=b'{"customers": [',
               headers={"content-type": "application/json"})
    stack.decisions(rid, timeout=5)       # the last exchange is logged
    stack.access_entries(rid, timeout=5)

    envoy_log = stack.envoy.log_text()
    access_log = stack.access_log_path.read_text()
    assert "consentry.decision " in envoy_log
    forbidden = sensitive_values(batch) + sensitive_values(iban)
    forbidden += [stack.hash_key, stack.subject_key]
    for text, where in ((envoy_log, "Envoy's log"), (access_log, "the access log")):
        for v in forbidden:
            assert v not in text, f"{v!r} appears in {where}"
    # Subject pseudonyms in the log are not raw ids.
    ids = {c["id"] for c in batch["customers"] + iban["customers"]}
    for d in stack.decisions():
        for s in d.get("subjects", []):
            assert s not in ids and s.startswith("s2:"), s
    json.dumps(stack.decisions())  # all parsed


def test_a_large_batch_is_recorded_whole_and_counted_exactly(stack):
    """120 records, 1,080 field decisions: the record aggregates them (one group per
    category, each standing for every record) instead of cutting the list short, and the
    counters count them all."""
    base = customers()["customers"][0]
    records = [dict(base, id=f"c-cap-{i}", email=f"cap{i}@example.com") for i in range(120)]
    before = stack.stats()
    r, rid = stack.send("analytics", "POST", "/v1/events", caller="profile",
                        body={"customers": records})
    assert r.status == 200, r.text()
    d = decision(stack, rid, "request")
    check_decision_shape(d)
    assert "fields" not in d and "fields_omitted" not in d, d
    assert d["records"] == 120 and len(d["subjects"]) == 120
    email = field_entry(d, "$.customers[*].email", "c-cap-77")
    assert (email["action"], email["n"], email["subjects"]) == ("strip", 120, "0-119"), email
    assert sum(g["n"] for g in d["decisions"]) == sum(d["counts"].values())
    assert sum(g["n"] for g in d["decisions"]) == 120 * sum(1 for k in base if k in DECLARED)
    # Far smaller than the data (v1 listed 200 decisions in ~30 KB and dropped the rest).
    assert len(json.dumps(d)) < 6000, len(json.dumps(d))
    after = stack.stats()
    stripped = _delta(before, after, "wasmcustom.consentry.category.user.contact.email.strip")
    assert stripped == 120, stripped
