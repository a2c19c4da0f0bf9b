"""Consent from the trusted gateway header x-consentry-consent (policy consent.header).

Only callers in consent.header.trusted_callers (the example policy: gateway) may send it;
it is ignored, with a note in the decision log's `detail`, from anyone else, when it
appears more than once, or when it is malformed. Per record, consent is looked up in the
record's own consents object, then the header (if it names the subject), then the store.

Callers are identified by their client certificates (stack.send(caller=...) goes over
the mTLS listener with that service's certificate and no caller header).

Every request goes to marketing (marketing.email, basis consent, key marketing_email)
with records that carry no consents object, for subject ids that no earlier test used
(helpers.fresh_id), so neither the store's data nor the filter's cache can answer for
them unless a test says so.
"""

from __future__ import annotations

import pytest

import consentry_env as ce
from helpers import (
    CONSENT_HEADER,
    HEADER_EVIDENCE,
    assert_consent_evidence,
    assert_marketing_view,
    check_decision_shape,
    consent_header_value,
    decision,
    fresh_id,
    received_json,
    record,
)


def _note(d: dict) -> str:
    return d.get("detail") or ""


def test_trusted_gateway_header_decides_for_the_subjects_it_names(stack):
    """The gateway, by its certificate, sends the consent header."""
    a, b, c = fresh_id(), fresh_id(), fresh_id()
    batch = {"customers": [record(a), record(b), record(c)]}
    # c is not in the header: the store answers for it.
    stack.services.store.set_data({c: {"marketing_email": True}}, merge=True)
    value = consent_header_value({a: ["social_profiling", "marketing_email"], b: []})
    r, rid = stack.send("marketing", "POST", "/v1/campaigns", caller="gateway", body=batch,
                        headers={CONSENT_HEADER: value})
    assert r.status == 200, r.text()
    assert_marketing_view(received_json(stack, "marketing"), batch, granted={a, c})

    d = decision(stack, rid, "request")
    check_decision_shape(d)
    assert d["caller"] == "gateway" and d["recipient"] == "marketing-email", d
    assert CONSENT_HEADER not in _note(d), f"the header was not used: {d.get('detail')}"
    assert_consent_evidence(d, a, HEADER_EVIDENCE, granted=True)
    assert_consent_evidence(d, b, HEADER_EVIDENCE, granted=False)
    assert_consent_evidence(d, c, "store", granted=True)

    st = stack.services.store.stats()
    assert a not in st["subjects"] and b not in st["subjects"], \
        f"the store was asked about subjects the header answers for: {st}"
    assert c in st["subjects"], f"the store was not asked about {c}: {st}"


def test_header_alone_needs_no_store(stack):
    """Every subject is in the header: a dead store does not matter."""
    stack.services.store.control("down")
    a, b = fresh_id(), fresh_id()
    batch = {"customers": [record(a), record(b)]}
    r, rid = stack.send("marketing", "POST", "/v1/campaigns", caller="gateway", body=batch,
                        headers={CONSENT_HEADER: consent_header_value(
                            {a: ["marketing_email"], b: ["social_profiling"]})})
    assert r.status == 200, r.text()
    assert_marketing_view(received_json(stack, "marketing"), batch, granted={a})
    assert stack.services.store.stats()["lookups"] == 0
    d = decision(stack, rid, "request")
    assert_consent_evidence(d, a, HEADER_EVIDENCE, granted=True)
    assert_consent_evidence(d, b, HEADER_EVIDENCE, granted=False)


# Who sends the header without being trusted for it: (client certificate, caller header
# sent along, the caller the decision must name; None: an unknown one).
UNTRUSTED = [
    # A known service that is not a trusted consent caller.
    ("profile", None, "profile"),
    # The mailer's certificate, claiming to be the gateway by header: the principal wins.
    ("marketing-email", "gateway", "marketing-email"),
    # A certificate whose SPIFFE id the policy does not know.
    (ce.STRANGER, None, None),
    # No certificate at all (the plain listener), naming nobody.
    (None, None, None),
]


@pytest.mark.parametrize("client,caller_header,caller", UNTRUSTED,
                         ids=["profile", "mailer-principal-forging-gateway",
                              "unknown-principal", "unidentified"])
def test_header_from_an_untrusted_caller_is_ignored(stack, client, caller_header, caller):
    a, b = fresh_id(), fresh_id()
    batch = {"customers": [record(a), record(b)]}
    headers = {CONSENT_HEADER: consent_header_value({a: ["marketing_email"],
                                                     b: ["marketing_email"]})}
    r, rid = stack.send("marketing", "POST", "/v1/campaigns", caller=client,
                        caller_header=caller_header, body=batch, headers=headers)
    assert r.status == 200, r.text()
    assert_marketing_view(received_json(stack, "marketing"), batch, granted=set())

    d = decision(stack, rid, "request")
    check_decision_shape(d)
    if caller:
        assert d["caller"] == caller, d["caller"]
    else:
        assert d["caller"].startswith("unknown("), d["caller"]
    assert CONSENT_HEADER in _note(d), \
        f"the decision does not say the header was ignored: detail={d.get('detail')!r}"
    for subject in (a, b):
        assert_consent_evidence(d, subject, "store:unknown_subject", granted=False)
    st = stack.services.store.stats()
    assert a in st["subjects"] and b in st["subjects"], st


def test_repeated_header_is_ignored(stack):
    a, b = fresh_id(), fresh_id()
    batch = {"customers": [record(a), record(b)]}
    grant = consent_header_value({a: ["marketing_email"], b: ["marketing_email"]})
    r, rid = stack.send("marketing", "POST", "/v1/campaigns", caller="gateway", body=batch,
                        headers=[(CONSENT_HEADER, grant), (CONSENT_HEADER, grant)])
    assert r.status == 200, r.text()
    assert_marketing_view(received_json(stack, "marketing"), batch, granted=set())
    d = decision(stack, rid, "request")
    assert d["caller"] == "gateway"
    assert CONSENT_HEADER in _note(d), f"detail={d.get('detail')!r}"
    for subject in (a, b):
        assert_consent_evidence(d, subject, "store:unknown_subject", granted=False)


MALFORMED = [
    ("no-equals", "{a}"),
    ("empty-subject", "{a}=marketing_email; =marketing_email"),
    ("subject-twice", "{a}=marketing_email; {a}=marketing_email"),
]


@pytest.mark.parametrize("template", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_header_is_ignored(stack, template):
    a = fresh_id()
    batch = {"customers": [record(a)]}
    r, rid = stack.send("marketing", "POST", "/v1/campaigns", caller="gateway", body=batch,
                        headers={CONSENT_HEADER: template.format(a=a)})
    assert r.status == 200, r.text()
    assert_marketing_view(received_json(stack, "marketing"), batch, granted=set())
    d = decision(stack, rid, "request")
    assert CONSENT_HEADER in _note(d), f"detail={d.get('detail')!r}"
    assert_consent_evidence(d, a, "store:unknown_subject", granted=False)


def test_record_consent_wins_over_the_header(stack):
    """The record's own answer comes first, whichever way each of them goes."""
    stack.services.store.control("down")
    a, b = fresh_id(), fresh_id()
    batch = {"customers": [record(a, {"marketing_email": False}),
                           record(b, {"marketing_email": True})]}
    value = consent_header_value({a: ["marketing_email"], b: []})
    r, rid = stack.send("marketing", "POST", "/v1/campaigns", caller="gateway", body=batch,
                        headers={CONSENT_HEADER: value})
    assert r.status == 200, r.text()
    assert_marketing_view(received_json(stack, "marketing"), batch, granted={b})
    d = decision(stack, rid, "request")
    assert_consent_evidence(d, a, "record:$.consents.marketing_email", granted=False)
    assert_consent_evidence(d, b, "record:$.consents.marketing_email", granted=True)
    assert stack.services.store.stats()["lookups"] == 0


def test_unconsented_ids_do_not_reach_the_recipient_through_the_header(stack):
    """marketing must not learn b's id, which it may not have (no consent): not in the
    body (hashed there), and not in the consent header the gateway sent along either."""
    a, b = fresh_id(), fresh_id()
    batch = {"customers": [record(a), record(b)]}
    value = consent_header_value({a: ["marketing_email"], b: []})
    r, _ = stack.send("marketing", "POST", "/v1/campaigns", caller="gateway", body=batch,
                      headers={CONSENT_HEADER: value})
    assert r.status == 200, r.text()
    got = received_json(stack, "marketing")
    assert_marketing_view(got, batch, granted={a})
    rec = stack.recorded("marketing")[0]
    leaked = [(k, v) for k, v in rec["headers"] if b in v]
    assert not leaked, f"{b} (no consent for marketing) reached marketing in headers {leaked}"


def test_the_header_is_removed_on_routes_no_binding_covers(stack):
    """Uncovered traffic is let through after reading :method and :path alone, but the
    consent header still never reaches an upstream: it names subjects."""
    a = fresh_id()
    value = consent_header_value({a: ["marketing_email"]})
    r, rid = stack.send("marketing", "POST", "/v1/metrics", caller="gateway",
                        body={"customers": [record(a)]}, headers={CONSENT_HEADER: value})
    assert r.status == 200, r.text()
    rec = stack.recorded("marketing")[0]
    assert rec["path"] == "/v1/metrics"
    names = [k.lower() for k, _ in rec["headers"]]
    assert CONSENT_HEADER not in names, rec["headers"]
    # The body passed as sent (nothing covers the route) and nothing was logged for it.
    assert a in rec["body"]
    assert stack.decisions(rid, timeout=0.5) == []
