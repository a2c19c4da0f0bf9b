"""The decision record JSON Schema (policies/consentry-decision-record.v2.schema.json).

Records of every kind the filter writes must validate (the end-to-end suite also checks
every record Envoy logs against it, tests/e2e/conftest.py), and records that break the
format, each in one way, must not: v1 records above all. Run with `pytest tests/schema`;
needs `jsonschema` (>= 4.18, for draft 2020-12).
"""

import copy
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "policies" / "consentry-decision-record.v2.schema.json"

FACTS = {
    "v": 2, "time": "2026-11-22T10:34:21.260Z",
    "request_id": "0b6f5a53-5f5e-4d7a-9a43-1c2d3e4f5a6b", "policy": "acme-customer-data",
    "binding": "customer-batch", "path": "/v1/campaigns", "caller": "profile",
    "caller_identity": "principal", "recipient": "marketing-email", "direction": "request",
    "mode": "enforce",
}

MODIFIED = {
    **FACTS, "outcome": "modified", "enforced": True, "records": 4,
    "subjects": ["s2:Pvb0YGZ4LvPONw7m", "s2:HBVhYUfmqDQ95UWG", "s2:Mz-rcMYi1UB9Xh5K",
                 "s2:5n1JdQwwHq1HTULT"],
    "decisions": [
        {"category": "user.contact.email", "action": "allow", "purpose": "marketing.email",
         "basis": "consent", "evidence": "record:$.consents.marketing_email",
         "paths": ["$.customers[*].email"], "n": 2, "subjects": "0,3"},
        {"category": "user.contact.email", "action": "strip", "reason": "no_consent",
         "purpose": "marketing.email", "basis": "consent", "evidence": "store:unknown_subject",
         "paths": ["$.customers[*].email", "header:x-customer-email"], "n": 3,
         "subjects": "1-2"},
        {"category": "user.contact.phone_number", "action": "mask", "reason": "no_purpose",
         "paths": ["$.customers[*].phone"], "n": 4, "subjects": "0-3"},
        {"category": "undeclared", "action": "strip", "reason": "undeclared",
         "paths": ["$.customers[*]['x y']", "$.customers[*].tags[*]"], "folded": 2, "n": 7},
    ],
    "counts": {"allow": 2, "mask": 4, "strip": 10},
}

UNREAD = {
    **FACTS, "recipient": "profile", "outcome": "allowed", "enforced": True,
    "inspected": False,
    "allowed_categories": [{"category": "user.name", "purpose": "essential.account",
                            "basis": "contract"}],
    "decisions": [], "counts": {},
}

REFUSED = {
    **FACTS, "outcome": "uninspectable", "enforced": True, "status": 400,
    "detail": "malformed_json: body is not valid JSON: EOF while parsing",
    "decisions": [], "counts": {},
}

BLOCKED = {
    **FACTS, "recipient": "analytics", "outcome": "blocked", "enforced": False, "mode": "audit",
    "blocked_categories": ["user.financial.bank_account"], "records": 1,
    "subjects": ["s2:Pvb0YGZ4LvPONw7m"],
    "decisions": [{"category": "user.financial.bank_account", "action": "block",
                   "reason": "no_purpose", "paths": ["$.customers[*].iban"], "n": 1,
                   "subjects": "0"}],
    "counts": {"block": 1},
}


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def errors(validator, doc):
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("record", [MODIFIED, UNREAD, REFUSED, BLOCKED],
                         ids=["modified", "unread", "refused", "blocked"])
def test_records_of_every_kind_validate(validator, record):
    assert not errors(validator, record)


def _v1(r):
    # A v1 record: no "v", a `fields` list with concrete paths and a subject each.
    del r["v"], r["decisions"], r["subjects"]
    r["fields"] = [{"path": "$.customers[0].email", "category": "user.contact.email",
                    "action": "allow", "subject": "s1:" + "a" * 32}]


def _group(key, value):
    def edit(r):
        r["decisions"][0][key] = value
    return edit


def _set(key, value):
    def edit(r):
        r[key] = value
    return edit


def _del_group_key(key):
    def edit(r):
        del r["decisions"][0][key]
    return edit


BROKEN = [
    ("a v1 record", _v1),
    ("another version", _set("v", 3)),
    ("a concrete path", _group("paths", ["$.customers[3].email"])),
    ("an s1 pseudonym", _set("subjects", ["s1:" + "a" * 32])),
    ("a raw subject id", _set("subjects", ["c-1001"])),
    ("a pseudonym of less than 96 bits", _set("subjects", ["s2:Pvb0YGZ4LvPO"])),
    ("subjects not as ranges", _group("subjects", [0, 3])),
    ("no count", _del_group_key("n")),
    ("a count of zero", _group("n", 0)),
    ("an allowed group with a reason", _group("reason", "no_purpose")),
    ("an allowed group without its purpose", _del_group_key("purpose")),
    ("an unknown action", _group("action", "encrypt")),
    ("an unknown key", _set("fields_omitted", 3)),
    ("a v1 key in a group", _group("path", "$.customers[0].email")),
    ("an evidence of no known kind", _group("evidence", "gut feeling")),
    ("no decisions", lambda r: r.pop("decisions")),
]


@pytest.mark.parametrize("edit", [b[1] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_records_do_not_validate(validator, edit):
    r = copy.deepcopy(MODIFIED)
    edit(r)
    assert errors(validator, r), f"the schema accepts {json.dumps(r)}"


def test_a_denied_group_needs_its_reason(validator):
    r = copy.deepcopy(MODIFIED)
    del r["decisions"][2]["reason"]
    assert errors(validator, r)


def test_a_group_without_listed_paths_says_how_many_were_folded(validator):
    r = copy.deepcopy(MODIFIED)
    r["decisions"][3]["paths"] = []
    assert not errors(validator, r)
    del r["decisions"][3]["folded"]
    assert errors(validator, r)
