"""Shared helpers and expectations for the end-to-end tests."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"

POLICY_NAME = "acme-customer-data"
REDACTED = "[redacted]"

# Record fields the example policy declares (besides id), and the kinds of values they hold.
DECLARED = ("id", "name", "email", "phone", "address", "birth_year", "country", "iban",
            "tax_id", "page_views")
ACTIONS = {"allow", "strip", "redact", "hash", "mask", "block"}
REASONS = {"no_purpose", "no_consent", "undeclared", "uninspectable"}
OUTCOMES = {"allowed", "modified", "blocked", "uninspectable"}


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def customers() -> dict:
    return fixture("customers.json")


def customers_with_iban() -> dict:
    return fixture("customers_with_iban.json")


def fresh_id() -> str:
    """A subject id no earlier test used, so the consent cache cannot know it."""
    return "c-9" + secrets.token_hex(5)


def record(cid: str, consents: dict | None = None, **extra) -> dict:
    """A customer record like the fixtures', for a given id."""
    r = {
        "id": cid,
        "name": f"Test Person {cid}",
        "email": f"{cid}@example.test",
        "phone": "+4930" + str(int(cid.encode().hex(), 16) % 10**8).zfill(8),
        "address": {"street": f"Teststrasse {len(cid)}", "city": "Berlin", "postcode": "10115"},
        "birth_year": 1980,
        "country": "DE",
        "page_views": 5,
    }
    if consents is not None:
        r["consents"] = consents
    r.update(extra)
    return r


def sensitive_values(batch: dict) -> list[str]:
    """Every string value of a declared customer field (plus raw ids) in a batch.

    None of them may appear in a log, a block body, or a recipient without a purpose.
    """
    out = []
    for c in batch["customers"]:
        for k in DECLARED:
            v = c.get(k)
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, dict):
                out.extend(x for x in v.values() if isinstance(x, str))
    # Short or all-digit strings (a postcode) would match thread ids and byte counts.
    return [v for v in out if len(v) >= 5 and not v.isdigit()]


def only_request(stack, service: str) -> dict:
    """The single request `service` received, asserting there was exactly one."""
    rec = stack.recorded(service)
    assert len(rec) == 1, f"{service} received {len(rec)} requests, expected 1: {rec}"
    return rec[0]


def header(rec: dict, name: str):
    for k, v in rec["headers"]:
        if k.lower() == name.lower():
            return v
    return None


def received_json(stack, service: str) -> dict:
    """The JSON body `service` received (exactly one request), with framing checked."""
    rec = only_request(stack, service)
    raw = rec["body"].encode()
    cl = header(rec, "content-length")
    assert cl is not None and int(cl) == len(raw), \
        f"upstream framing: content-length {cl} vs {len(raw)} body bytes"
    try:
        return json.loads(raw)
    except ValueError as e:
        raise AssertionError(f"{service} received a body that is not JSON ({e}): {raw[:300]!r}")


def assert_masked(value, original: str, keep_last: int = 4):
    assert isinstance(value, str), f"masked value should be a string, got {value!r}"
    assert value != original, "value was not masked"
    assert value.endswith(original[-keep_last:]), f"{value!r} should keep the last {keep_last}"
    head = value[: -keep_last]
    assert head and set(head) == {"*"}, f"{value!r}: everything but the last {keep_last} " \
                                        "characters should be '*'"


def assert_hashed(value, original: str):
    assert isinstance(value, str), f"hashed id should be a string, got {value!r}"
    assert value != original and original not in value, f"id {original!r} not pseudonymised"
    assert len(value) >= 8, f"pseudonym {value!r} too short to be a keyed hash"


def assert_intact(rec: dict, orig: dict, keys):
    for k in keys:
        assert k in rec, f"{k} missing for {orig['id']}: {rec}"
        assert rec[k] == orig[k], f"{k} changed for {orig['id']}: {rec[k]!r} != {orig[k]!r}"


def assert_absent(rec: dict, keys, who=""):
    for k in keys:
        assert k not in rec, f"{k} should be stripped{who}: {rec}"


def assert_marketing_view(got: dict, batch: dict, granted: set[str]):
    """What the marketing-email service may see: name/email/id only with consent."""
    assert len(got["customers"]) == len(batch["customers"])
    for orig, rec in zip(batch["customers"], got["customers"]):
        if orig["id"] in granted:
            assert_intact(rec, orig, ("id", "name", "email"))
        else:
            assert_hashed(rec.get("id"), orig["id"])
            assert rec.get("name") == REDACTED, rec
            assert_absent(rec, ("email",), f" for {orig['id']} (no consent)")
        assert_masked(rec.get("phone"), orig["phone"])
        assert_absent(rec, ("address", "birth_year", "country", "page_views", "tax_id"),
                      " for marketing (no purpose)")


def assert_no_customer_values(text: str, batch: dict, where: str):
    for v in sensitive_values(batch):
        assert v not in text, f"customer value {v!r} leaked into {where}"


def decision(stack, rid: str, direction: str, timeout: float = 5.0) -> dict:
    """The one decision log entry of request `rid` in `direction`."""
    found = [d for d in stack.decisions(rid, timeout=timeout) if d.get("direction") == direction]
    if not found:
        # The other direction may come later; wait once more for this one specifically.
        found = [d for d in stack.decisions(rid, min_count=2, timeout=timeout)
                 if d.get("direction") == direction]
    assert len(found) == 1, f"expected one {direction} decision for {rid}, got {found}"
    return found[0]


def field_entries(d: dict, path: str) -> list[dict]:
    return [f for f in d.get("fields", []) if f.get("path") == path]


def field_entry(d: dict, path: str) -> dict:
    found = field_entries(d, path)
    assert len(found) == 1, f"expected one decision for {path}, got {found} in {d}"
    return found[0]


def check_decision_shape(d: dict):
    """The decision log contract every entry must keep."""
    # `time` is checked once, in test_observability (so a naming slip fails one test).
    for key in ("request_id", "policy", "caller", "recipient", "direction", "mode",
                "outcome", "fields"):
        assert key in d, f"decision log lacks {key!r}: {d}"
    assert d["policy"] == POLICY_NAME
    assert d["direction"] in ("request", "response")
    assert d["mode"] in ("enforce", "audit")
    assert d["outcome"] in OUTCOMES, d["outcome"]
    assert isinstance(d["fields"], list)
    for f in d["fields"]:
        for key in ("path", "category", "action"):
            assert key in f, f"field decision lacks {key!r}: {f}"
        assert f["action"] in ACTIONS, f
        if f["action"] == "allow":
            assert f.get("reason") is None, f"allowed field with a reason: {f}"
        else:
            assert f.get("reason") in REASONS, f"denied field without a valid reason: {f}"



# -- consent header (policy consent.header) -------------------------------------------

CONSENT_HEADER = "x-consentry-consent"
HEADER_EVIDENCE = f"header:{CONSENT_HEADER}"
MARKETING_CONSENT_FIELDS = ("id", "name", "email")  # what marketing.email may receive


def consent_header_value(grants: dict) -> str:
    """`SUBJECT=key1,key2; SUBJECT2=` from {subject: [keys]} (an empty list: none)."""
    return "; ".join(f"{s}={','.join(keys)}" for s, keys in grants.items())


def assert_consent_evidence(d: dict, index: int, evidence: str, granted: bool,
                            keys=MARKETING_CONSENT_FIELDS):
    """The marketing.email decisions of record `index`: allowed or not, and from where."""
    for k in keys:
        f = field_entry(d, f"$.customers[{index}].{k}")
        assert f.get("purpose") == "marketing.email", f
        assert f.get("evidence") == evidence, \
            f"$.customers[{index}].{k}: evidence {f.get('evidence')!r}, expected {evidence!r}: {f}"
        if granted:
            assert f["action"] == "allow", f"$.customers[{index}].{k} should be allowed: {f}"
        else:
            assert f["action"] != "allow" and f.get("reason") == "no_consent", \
                f"$.customers[{index}].{k} should be denied for no_consent: {f}"
