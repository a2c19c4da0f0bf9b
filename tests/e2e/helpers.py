"""Shared helpers and expectations for the end-to-end tests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from pathlib import Path

import consentry_env as ce

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


class Record(dict):
    """A decision record (format v2) as the filter logged it, knowing the subject key of
    the stack that wrote it, so that tests can name subjects by their raw ids."""
    subject_key: str | None = None


def pseudonym(key: str, subject: str) -> str:
    """The engine's subject pseudonym (plugin/src/engine/actions.rs, subject_pseudonym):
    `s2:` and the first 96 bits of HMAC-SHA256(key, subject) in base64url."""
    mac = hmac.new(key.encode(), subject.encode(), hashlib.sha256).digest()[:12]
    return "s2:" + base64.urlsafe_b64encode(mac).decode().rstrip("=")


def template(path: str) -> str:
    """A concrete JSONPath as the record writes it: every index `[*]`."""
    return re.sub(r"\[[0-9]+\]", "[*]", path)


def decision(stack, rid: str, direction: str, timeout: float = 5.0) -> Record:
    """The one decision record of request `rid` in `direction`."""
    found = [d for d in stack.decisions(rid, timeout=timeout) if d.get("direction") == direction]
    if not found:
        # The other direction may come later; wait once more for this one specifically.
        found = [d for d in stack.decisions(rid, min_count=2, timeout=timeout)
                 if d.get("direction") == direction]
    assert len(found) == 1, f"expected one {direction} decision for {rid}, got {found}"
    rec = Record(found[0])
    rec.subject_key = stack.subject_key
    return rec


def subject_indexes(g: dict) -> list[int]:
    """A group's subjects, `"0-3,5"`, as indexes into the record's `subjects`."""
    out = []
    for part in g.get("subjects", "").split(",") if g.get("subjects") else []:
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def group_subjects(d: dict, g: dict) -> list[str]:
    """The pseudonyms of a group's subjects."""
    return [d["subjects"][i] for i in subject_indexes(g)]


def field_entries(d: dict, path: str, subject: str | None = None) -> list[dict]:
    """The decision groups of record `d` that list `path` (a template, or a concrete
    path, which is templated) and, given a raw subject id, hold that subject."""
    assert subject is not None or template(path) == path, \
        f"{path}: a record names records by subject: pass the template and the subject id"
    path = template(path)
    found = [g for g in d.get("decisions", []) if path in g.get("paths", [])]
    if subject is not None:
        assert isinstance(d, Record) and d.subject_key, \
            "name subjects only in a record from helpers.decision()"
        want = pseudonym(d.subject_key, subject)
        found = [g for g in found if want in group_subjects(d, g)]
    return found


def field_entry(d: dict, path: str, subject: str | None = None) -> dict:
    """The one decision group at `path` (about `subject`, a raw id, if given)."""
    found = field_entries(d, path, subject)
    assert len(found) == 1, \
        f"expected one decision group for {path} (subject {subject}), got {found} in {d}"
    return found[0]


def check_decision_shape(d: dict):
    """The decision record contract every entry must keep (format v2): it matches
    policies/consentry-decision-record.v2.schema.json, with the rules the schema cannot
    say (ce.decision_problems)."""
    # `time` is checked once, in test_observability (so a naming slip fails one test).
    for key in ("v", "request_id", "policy", "caller", "recipient", "direction", "mode",
                "outcome", "decisions", "counts"):
        assert key in d, f"decision record lacks {key!r}: {d}"
    assert d["v"] == 2, d
    assert d["policy"] == POLICY_NAME
    assert d["outcome"] in OUTCOMES, d["outcome"]
    problems = ce.decision_problems(dict(d))
    assert not problems, f"decision record does not match the v2 schema: {problems}: {d}"
    for g in d["decisions"]:
        assert g["action"] in ACTIONS, g
        if g["action"] == "allow":
            assert g.get("reason") is None, f"allowed group with a reason: {g}"
        else:
            assert g.get("reason") in REASONS, f"denied group without a valid reason: {g}"


# -- consent header (policy consent.header) -------------------------------------------

CONSENT_HEADER = "x-consentry-consent"
HEADER_EVIDENCE = f"header:{CONSENT_HEADER}"
MARKETING_CONSENT_FIELDS = ("id", "name", "email")  # what marketing.email may receive


def consent_header_value(grants: dict) -> str:
    """`SUBJECT=key1,key2; SUBJECT2=` from {subject: [keys]} (an empty list: none)."""
    return "; ".join(f"{s}={','.join(keys)}" for s, keys in grants.items())


def assert_consent_evidence(d: dict, subject: str, evidence: str, granted: bool,
                            keys=MARKETING_CONSENT_FIELDS):
    """The marketing.email decisions of the record of `subject` (a raw id): allowed or
    not, and from where."""
    for k in keys:
        f = field_entry(d, f"$.customers[*].{k}", subject)
        assert f.get("purpose") == "marketing.email", f
        assert f.get("evidence") == evidence, \
            f"{k} of {subject}: evidence {f.get('evidence')!r}, expected {evidence!r}: {f}"
        if granted:
            assert f["action"] == "allow", f"{k} of {subject} should be allowed: {f}"
        else:
            assert f["action"] != "allow" and f.get("reason") == "no_consent", \
                f"{k} of {subject} should be denied for no_consent: {f}"
