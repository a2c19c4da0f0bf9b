"""The consent store: asked through the consent_store cluster for subjects whose record
carries no answer, cached across requests (policy cache_ttl_s: 30), and when it cannot
answer, the message is refused (503) rather than sent without consent checks.

Every test here uses subject ids no other test used (helpers.fresh_id), so the filter's
cache from earlier tests cannot hide a lookup.
"""

from __future__ import annotations

import time

import pytest

from helpers import (
    assert_marketing_view,
    assert_no_customer_values,
    decision,
    fresh_id,
    received_json,
    record,
)


def _batch_needing_store():
    granted, unknown, said_no = fresh_id(), fresh_id(), fresh_id()
    batch = {"customers": [
        record(granted),                                   # store: marketing_email true
        record(unknown),                                   # store has never heard of it
        record(said_no),                                   # store: marketing_email false
        record(fresh_id(), {"marketing_email": True, "social_profiling": False}),
    ]}
    data = {granted: {"marketing_email": True, "social_profiling": False},
            said_no: {"marketing_email": False, "social_profiling": True}}
    return batch, data, {"granted": granted, "unknown": unknown, "said_no": said_no}


def test_store_decides_for_records_without_consent(stack):
    batch, data, ids = _batch_needing_store()
    stack.services.store.set_data(data, merge=True)
    r, rid = stack.send("marketing", "POST", "/v1/campaigns", caller="profile", body=batch)
    assert r.status == 200, r.text()
    granted = {ids["granted"], batch["customers"][3]["id"]}
    assert_marketing_view(received_json(stack, "marketing"), batch, granted)

    st = stack.services.store.stats()
    assert st["lookups"] >= 1
    for s in (ids["granted"], ids["unknown"], ids["said_no"]):
        assert s in st["subjects"], f"{s} was not looked up: {st}"
    assert all(q["authority"].split(":")[0] == "consent.acme.internal"
               for q in st["requests"]), st["requests"]
    d = decision(stack, rid, "request")
    assert d["outcome"] == "modified"


def test_store_answers_are_cached(stack):
    batch, data, ids = _batch_needing_store()
    stack.services.store.set_data(data, merge=True)
    r, _ = stack.send("marketing", "POST", "/v1/campaigns", caller="profile", body=batch)
    assert r.status == 200, r.text()
    first = stack.services.store.stats()["lookups"]
    assert first >= 1
    # More identical requests, on new connections (so over both workers): no new lookup
    # within the TTL, and the same answer.
    for _ in range(4):
        r, _ = stack.send("marketing", "POST", "/v1/campaigns", caller="profile", body=batch)
        assert r.status == 200, r.text()
    assert stack.services.store.stats()["lookups"] == first, stack.services.store.stats()
    bodies = [rec["body"] for rec in stack.recorded("marketing")]
    assert len(bodies) == 5 and len(set(bodies)) == 1


def test_store_not_needed_when_records_carry_consent(stack):
    """Every record answers for itself: a dead store does not matter."""
    stack.services.store.control("down")
    batch = {"customers": [
        record(fresh_id(), {"marketing_email": True, "social_profiling": False}),
        record(fresh_id(), {"marketing_email": False, "social_profiling": False}),
    ]}
    r, _ = stack.send("marketing", "POST", "/v1/campaigns", caller="profile", body=batch)
    assert r.status == 200, r.text()
    assert stack.services.store.stats()["lookups"] == 0
    assert_marketing_view(received_json(stack, "marketing"), batch,
                          {batch["customers"][0]["id"]})


def test_store_not_asked_for_recipients_without_consent_purposes(stack):
    """analytics' only purpose is legitimate_interests: no consent to look up."""
    stack.services.store.control("down")
    batch = {"customers": [record(fresh_id()), record(fresh_id())]}
    r, _ = stack.send("analytics", "POST", "/v1/events", caller="profile", body=batch)
    assert r.status == 200, r.text()
    assert stack.services.store.stats()["lookups"] == 0


@pytest.mark.parametrize("mode", ["down", "slow", "error500", "garbage"])
def test_store_failure_refuses_the_message(stack, mode):
    stack.services.store.control(mode, delay_ms=1500)
    batch = {"customers": [record(fresh_id()), record(fresh_id())]}
    t0 = time.monotonic()
    r, rid = stack.send("marketing", "POST", "/v1/campaigns", caller="profile", body=batch)
    elapsed = time.monotonic() - t0
    assert r.status == 503, f"store {mode}: {r.status} {r.text()[:300]}"
    body = r.json()
    assert body["error"] == "consentry_uninspectable"
    assert isinstance(body.get("reason"), str) and body["reason"]
    assert_no_customer_values(r.text(), batch, "the refusal")
    assert stack.recorded("marketing") == [], "the upstream received a message"
    assert stack.services.store.stats()["lookups"] >= 1
    if mode == "slow":
        # policy timeout_ms is 250: the filter gives up long before the store answers.
        assert elapsed < 1.4, f"waited {elapsed:.2f}s for a store with 250 ms timeout"
    d = decision(stack, rid, "request")
    assert d["outcome"] == "uninspectable"
    # A failed lookup is not cached as "no consent": once the store is back, it works.
    stack.services.store.control("ok")
    r, _ = stack.send("marketing", "POST", "/v1/campaigns", caller="profile", body=batch)
    assert r.status == 200, r.text()
