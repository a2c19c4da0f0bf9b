"""The caller's identity from mTLS: Envoy's second listener (ingress_mtls) requires a
client certificate from the test CA (made with openssl for each stack, in
<run_dir>/tls), and consentry maps the certificate's URI SAN, a SPIFFE id
(`connection.uri_san_peer_certificate`), to a service through `services.*.principals`.
A known principal wins over the caller header x-consentry-caller.

Every other test names its caller the same way: `stack.send(..., caller=X)` presents X's
certificate on this listener and sends no caller header (consentry_env.Stack.send).
"""

from __future__ import annotations

import json

import pytest

import consentry_env as ce
from helpers import (
    REDACTED,
    assert_absent,
    assert_hashed,
    assert_intact,
    assert_marketing_view,
    assert_masked,
    assert_no_customer_values,
    check_decision_shape,
    customers,
    decision,
    only_request,
)

MARKETING_GRANTED = {"c-1001", "c-1003", "c-1004"}  # record consents, and the store for c-1003


def _peer_uri_san(stack, rid):
    entries = stack.access_entries(rid)
    assert len(entries) == 1, entries
    return entries[0].get("peer_uri_san")


def test_test_ca_identities_are_the_policys_principals(pki):
    """Every service of the example policy with a principal has a client certificate,
    named like the service and carrying that principal; `stranger` carries a SPIFFE id
    the policy does not know."""
    services = json.loads(ce.DEFAULT_POLICY.read_text())["services"]
    with_principals = {name for name, s in services.items() if s.get("principals")}
    assert with_principals >= {"profile", "gateway", "marketing-email", "analytics",
                               "billing", "support", "social-enrichment"}
    assert set(ce.TEST_CLIENTS) == with_principals | {ce.STRANGER}
    for name in with_principals:
        assert ce.TEST_CLIENTS[name] in services[name]["principals"], name
        assert pki.client_cert(name)[0].is_file(), name
    every = {p for s in services.values() for p in s.get("principals", [])}
    assert ce.TEST_CLIENTS[ce.STRANGER] not in every


def test_a_caller_without_a_certificate_is_refused_by_the_test_client(stack):
    """`caller=` means a certificate: a name the test CA has none for is an error, not a
    request silently sent unidentified or with a header."""
    with pytest.raises(ce.EnvError, match="no client certificate"):
        stack.send("profile", "GET", "/v1/customers", caller="nobody-we-know")
    assert stack.recorded("profile") == []


def test_caller_goes_by_certificate_without_a_caller_header(stack):
    r, rid = stack.send("profile", "GET", "/v1/customers", caller="analytics")
    assert r.status == 200, r.text()
    sent = {k.lower() for k, _ in only_request(stack, "profile")["headers"]}
    assert "x-consentry-caller" not in sent, sent
    (entry,) = stack.access_entries(rid)
    assert entry["peer_uri_san"] == ce.TEST_CLIENTS["analytics"]
    assert entry["caller"] in (None, "-"), entry
    d = decision(stack, rid, "response")
    assert d["caller"] == "analytics" and d["recipient"] == "analytics", d


def test_marketing_principal_gets_the_consented_view(stack):
    r, rid = stack.send_mtls("marketing-email", "profile", "GET", "/v1/customers")
    assert r.status == 200, r.text()
    rec = only_request(stack, "profile")
    assert rec["method"] == "GET"
    assert "x-consentry-caller" not in {k.lower() for k, _ in rec["headers"]}
    assert_marketing_view(r.json(), customers(), granted=MARKETING_GRANTED)

    d = decision(stack, rid, "response")
    check_decision_shape(d)
    assert d["caller"] == "marketing-email"
    assert d["recipient"] == "marketing-email"
    assert d["outcome"] == "modified"
    assert _peer_uri_san(stack, rid) == ce.TEST_CLIENTS["marketing-email"]


def test_analytics_principal_gets_the_analytics_view(stack):
    batch = customers()
    r, rid = stack.send_mtls("analytics", "profile", "GET", "/v1/customers")
    assert r.status == 200, r.text()
    got = r.json()
    assert len(got["customers"]) == len(batch["customers"])
    for orig, rec in zip(batch["customers"], got["customers"]):
        assert_hashed(rec.get("id"), orig["id"])
        assert rec.get("name") == REDACTED
        assert_masked(rec.get("phone"), orig["phone"])
        assert_absent(rec, ("email", "address", "tax_id"), " for analytics")
        assert_intact(rec, orig, ("birth_year", "country", "page_views"))
    d = decision(stack, rid, "response")
    assert d["caller"] == "analytics" and d["recipient"] == "analytics"


def test_principal_wins_over_a_forged_caller_header(stack):
    """The mailer's certificate with `x-consentry-caller: billing` (billing would see every
    e-mail address under its contract): the principal decides, not the header."""
    batch = customers()
    r, rid = stack.send_mtls("marketing-email", "profile", "GET", "/v1/customers",
                             caller_header="billing")
    assert r.status == 200, r.text()
    got = r.json()
    assert_marketing_view(got, batch, granted=MARKETING_GRANTED)
    # c-1002 said no to marketing e-mail: billing would have had the address.
    assert "email" not in got["customers"][1], got["customers"][1]
    d = decision(stack, rid, "response")
    assert d["caller"] == "marketing-email" and d["recipient"] == "marketing-email", d


def test_unknown_principal_gets_no_customer_data(stack):
    spiffe = ce.TEST_CLIENTS["stranger"]
    batch = customers()
    r, rid = stack.send_mtls("stranger", "profile", "GET", "/v1/customers")
    assert r.status == 200, r.text()
    assert_no_customer_values(r.text(), batch, "a response to an unknown principal")
    for orig, rec in zip(batch["customers"], r.json()["customers"]):
        for k in ("birth_year", "country", "page_views", "address"):
            assert k not in rec or rec[k] != orig[k], f"{k} reached an unknown principal"
    d = decision(stack, rid, "response")
    check_decision_shape(d)
    assert d["caller"] == f"unknown(principal={spiffe})", d["caller"]
    assert d["recipient"] == f"unknown(principal={spiffe})", d["recipient"]
    assert d["decisions"] and all(g["action"] != "allow" for g in d["decisions"]), d["decisions"]
    assert _peer_uri_san(stack, rid) == spiffe


@pytest.mark.parametrize("client", [None, ce.ROGUE_CLIENT],
                         ids=["no-certificate", "certificate-from-another-ca"])
def test_without_a_trusted_client_certificate_there_is_no_connection(stack, client):
    with pytest.raises(OSError) as exc:  # ssl.SSLError, or a reset / EOF in the handshake
        stack.send_mtls(client, "profile", "GET", "/v1/customers")
    assert not isinstance(exc.value, TimeoutError), f"no answer at all: {exc.value!r}"
    assert stack.recorded("profile") == [], "a request got through without a valid certificate"
