"""The policy JSON Schema (policies/consentry-policy.schema.json) against the policies.

Every policy under policies/ must validate, and a set of broken variants of the example
policy, each wrong in one way the filter also refuses, must not. Run with
`pytest tests/schema`; needs `jsonschema` (>= 4.18, for draft 2020-12).
"""

import copy
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
SCHEMA_PATH = POLICIES / "consentry-policy.schema.json"
EXAMPLE = POLICIES / "acme-customers.json"


def policy_files():
    # Not the JSON Schemas (this one, and the decision record's).
    return sorted(p for p in POLICIES.glob("*.json") if not p.name.endswith(".schema.json"))


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@pytest.fixture(scope="module")
def example():
    return json.loads(EXAMPLE.read_text())


def errors(validator, doc):
    return list(validator.iter_errors(doc))


def test_schema_is_valid_draft_2020_12():
    Draft202012Validator.check_schema(json.loads(SCHEMA_PATH.read_text()))


def test_there_are_policies_to_check():
    assert EXAMPLE in policy_files()


@pytest.mark.parametrize("path", policy_files(), ids=lambda p: p.name)
def test_every_policy_validates(validator, path):
    doc = json.loads(path.read_text())
    problems = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors(validator, doc)]
    assert not problems, f"{path.name} does not match the schema:\n" + "\n".join(problems)


# Variants: (id, function that edits a copy of the example). Each one is a policy the
# filter refuses too (compile.rs or serde), so the schema must refuse it.

def _set(path, value):
    def edit(p):
        cur = p
        for k in path[:-1]:
            cur = cur[k]
        cur[path[-1]] = value
    return edit


def _del(path):
    def edit(p):
        cur = p
        for k in path[:-1]:
            cur = cur[k]
        del cur[path[-1]]
    return edit


FIELD0 = ["messages", 0, "fields", 0]

BROKEN = [
    ("unknown top-level key", _set(["modee"], "audit")),
    ("$schema key (deny_unknown_fields)", _set(["$schema"], "x")),
    ("unknown key in limits", _set(["limits", "max_bytes"], 10)),
    ("unknown key in service", _set(["services", "profile", "cluster"], "profile")),
    ("unknown key in purpose", _set(["purposes", "essential.account", "bases"], "contract")),
    ("unknown key in field binding", _set(FIELD0 + ["categroy"], "user.name")),
    ("unknown key in message binding", _set(["messages", 0, "record"], "$")),
    ("unknown key in store", _set(["consent", "store", "ttl"], 5)),
    ("unknown key in mask", _set(FIELD0 + ["action"], {"mask": {"keep_middle": 2}})),
    ("format version 2", _set(["consentry"], 2)),
    ("format version as string", _set(["consentry"], "1")),
    ("blank name", _set(["name"], "  ")),
    ("bad mode", _set(["mode"], "dry_run")),
    ("bad fail", _set(["fail"], "ajar")),
    ("bad undeclared", _set(["undeclared"], "deny")),
    ("bad basis", _set(["purposes", "essential.account", "basis"], "legitimate_interest")),
    ("basis consent without consent_key", _del(["purposes", "marketing.email", "consent_key"])),
    ("consent_key with basis contract", _set(["purposes", "essential.account", "consent_key"], "x")),
    ("blank consent_key", _set(["purposes", "marketing.email", "consent_key"], " ")),
    ("purpose allows nothing", _set(["purposes", "essential.account", "allows"], [])),
    ("upper-case category", _set(["purposes", "essential.account", "allows"], ["User"])),
    ("category with empty part", _set(FIELD0 + ["category"], "user..name")),
    ("purpose name not dotted lower-case", _set(["purposes", "Marketing"], {"basis": "contract", "allows": ["user"]})),
    ("service name with a space", _set(["services", "my service"], {})),
    ("principal not SPIFFE", _set(["services", "profile", "principals"], ["profile.acme.internal"])),
    ("empty cluster entry", _set(["services", "profile", "clusters"], [""])),
    ("bad action string", _set(FIELD0 + ["action"], "delete")),
    ("action in upper case", _set(FIELD0 + ["action"], "Strip")),
    ("mask as a bare string", _set(FIELD0 + ["action"], "mask")),
    ("mask with negative keep_last", _set(FIELD0 + ["action"], {"mask": {"keep_last": -1}})),
    ("bad default_action", _set(["default_action"], "drop")),
    ("empty redact_marker", _set(["redact_marker"], "")),
    ("max_depth 0", _set(["limits", "max_depth"], 0)),
    ("max_depth 128", _set(["limits", "max_depth"], 128)),
    ("max_body_bytes over 64 MiB", _set(["limits", "max_body_bytes"], 67108865)),
    ("max_records 0", _set(["limits", "max_records"], 0)),
    ("timeout_ms 0", _set(["consent", "store", "timeout_ms"], 0)),
    ("timeout_ms over a minute", _set(["consent", "store", "timeout_ms"], 60001)),
    ("cache_ttl_s over a day", _set(["consent", "store", "cache_ttl_s"], 86401)),
    ("store path not absolute", _set(["consent", "store", "path"], "v1/consents:lookup")),
    ("store without cluster", _del(["consent", "store", "cluster"])),
    ("consent header without trusted callers", _set(["consent", "header", "trusted_callers"], [])),
    ("consent header name with a space", _set(["consent", "header", "name"], "x consent")),
    ("caller header with a colon", _set(["identity", "caller_header", "name"], "x:caller")),
    ("caller header as a bare name (format before trusted_from)",
     _set(["identity", "caller_header"], "x-consentry-caller")),
    ("caller header trusted from nobody", _set(["identity", "caller_header"], {"name": "x-caller"})),
    ("caller header with empty trusted_from",
     _set(["identity", "caller_header"], {"name": "x-caller", "trusted_from": []})),
    ("caller header with an unknown key",
     _set(["identity", "caller_header", "trusted"], ["gateway"])),
    ("case_sensitive_paths not a boolean", _set(["services", "profile", "case_sensitive_paths"], "yes")),
    ("case_sensitive on a header binding", _set(["messages", 0, "headers", 0, "case_sensitive"], True)),
    ("query binding name with brackets", _set(["messages", 0, "query", 0, "name"], "email[]")),
    ("bad shape_mismatch", _set(["messages", 0, "shape_mismatch"], "allow")),
    ("binding path with a fragment", _set(["messages", 0, "paths"], ["/v1/customers#x"])),
    ("binding path without leading slash", _set(["messages", 0, "paths"], ["v1/customers"])),
    ("binding path with a query", _set(["messages", 0, "paths"], ["/v1/customers?x=1"])),
    ("method with a digit", _set(["messages", 0, "methods"], ["GET2"])),
    ("bad direction", _set(["messages", 0, "direction"], "inbound")),
    ("records without $", _set(["messages", 0, "records"], "customers[*]")),
    ("field path is the whole record", _set(FIELD0 + ["path"], "$")),
    ("message_subject with two keys", _set(["messages", 0, "message_subject"], {"header": "a", "query": "b"})),
    ("message_subject empty", _set(["messages", 0, "message_subject"], {})),
    ("message_subject from a cookie", _set(["messages", 0, "message_subject"], {"cookie": "id"})),
    ("header binding on a pseudo-header", _set(["messages", 0, "headers", 0, "name"], ":path")),
    ("query binding with empty name", _set(["messages", 0, "query", 0, "name"], "")),
    ("no message bindings", _set(["messages"], [])),
    ("binding that declares nothing, undeclared allow",
     _set(["messages", 0], {"name": "empty", "paths": ["/x"]})),
    ("missing consentry", _del(["consentry"])),
    ("missing name", _del(["name"])),
    ("missing services", _del(["services"])),
    ("missing purposes", _del(["purposes"])),
    ("missing messages", _del(["messages"])),
    ("purpose without basis", _del(["purposes", "essential.account", "basis"])),
    ("purpose without allows", _del(["purposes", "essential.account", "allows"])),
    ("field without category", _del(FIELD0 + ["category"])),
    ("field without path", _del(FIELD0 + ["path"])),
    ("message binding without name", _del(["messages", 0, "name"])),
    ("null for a defaulted non-Option key", _set(["limits"], None)),
]


@pytest.mark.parametrize("edit", [e for _, e in BROKEN], ids=[n for n, _ in BROKEN])
def test_broken_variants_are_rejected(validator, example, edit):
    doc = copy.deepcopy(example)
    edit(doc)
    assert errors(validator, doc), "the schema accepted a policy the filter refuses"


# Variants the filter accepts: the schema must accept them too.
GOOD = [
    ("minimal policy", lambda p: p.clear() or p.update({
        "consentry": 1, "name": "min", "services": {}, "purposes": {},
        "messages": [{"name": "m", "fields": [{"path": "$.email", "category": "user.contact.email"}]}],
    })),
    ("undeclared strip allows a binding without fields",
     lambda p: (p.update({"undeclared": "strip"}), p["messages"].append({"name": "all", "paths": ["/x"]}))),
    ("mask with no options", _set(FIELD0 + ["action"], {"mask": {}})),
    ("mask with every option", _set(FIELD0 + ["action"], {"mask": {"keep_first": 1, "keep_last": 0, "keep_domain": True}})),
    ("null for Option keys", lambda p: p.update({"default_action": None, "redact_marker": None})),
    ("message_subject from the query", _set(["messages", 0, "message_subject"], {"query": "customer_id"})),
    ("audit mode, fail open", lambda p: p.update({"mode": "audit", "fail": "open"})),
    ("cache_ttl_s 0", _set(["consent", "store", "cache_ttl_s"], 0)),
    ("every basis", _set(["purposes", "x.y"], {"basis": "vital_interests", "allows": ["user.health"]})),
    ("jsonpath subset", _set(["messages", 0, "records"], "$..customers[*]['a','b'][-1]")),
    ("caller header trusted on plaintext only",
     _set(["identity", "caller_header"], {"name": "x-caller", "trust_plaintext": True})),
    ("case-sensitive paths", _set(["services", "profile", "case_sensitive_paths"], True)),
    ("case-sensitive query parameter", _set(["messages", 0, "query", 0, "case_sensitive"], True)),
    ("shape_mismatch pass", _set(["messages", 0, "shape_mismatch"], "pass")),
]


@pytest.mark.parametrize("edit", [e for _, e in GOOD], ids=[n for n, _ in GOOD])
def test_valid_variants_are_accepted(validator, example, edit):
    doc = copy.deepcopy(example)
    edit(doc)
    problems = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors(validator, doc)]
    assert not problems, "\n".join(problems)
