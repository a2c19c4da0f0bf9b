"""The hash key and the subject key stay in Envoy's process environment.

The bootstrap names them in the wasm VM's `host_env_keys` (never `key_values`, whose
values Envoy's admin /config_dump prints), and the stack starts Envoy with both in its
environment, random per stack (consentry_env.random_key). After traffic that hashes ids,
names subjects in decision logs and asks the consent store, neither key may appear
anywhere an operator, a log pipeline, a client or an upstream can read: Envoy's admin
endpoints, its log, the access log, the decision records, the response bodies, what the
upstreams and the consent store received, or the rendered bootstrap file.

So that the test cannot pass vacuously, it also shows that the keys were in use: the ids
analytics received and the subject pseudonyms of the decision log are exactly the
HMAC-SHA256 pseudonyms of those ids under this stack's keys (the engine's `keyed_digest`
for hashes: `h1:`, then the first 16 bytes of the HMAC in hex; `subject_pseudonym` for
subjects: `s2:`, then its first 12 bytes in base64url), and both keys are in the Envoy
process's environment.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest

import consentry_env as ce
from helpers import (
    customers,
    customers_with_iban,
    decision,
    fresh_id,
    received_json,
    record,
)

# Admin endpoints an operator (or anything that can reach the admin port) can read.
ADMIN_PATHS = (
    "/config_dump",
    "/config_dump?include_eds",
    "/stats",
    "/stats?format=json",
    "/stats/prometheus",
    "/server_info",
    "/clusters",
    "/clusters?format=json",
    "/listeners?format=json",
    "/runtime",
    "/certs",
)


def pseudonym(tag: str, key: str, data: str) -> str:
    """The engine's keyed pseudonyms (plugin/src/engine/actions.rs): `h1:` (hash,
    keyed_digest) is the first 16 bytes of the HMAC in hex, `s2:` (subjects,
    subject_pseudonym) its first 12 bytes in base64url."""
    mac = hmac.new(key.encode(), data.encode(), hashlib.sha256).digest()
    if tag == "s2:":
        return tag + base64.urlsafe_b64encode(mac[:12]).decode().rstrip("=")
    return tag + mac.hex()[:32]


def _forms(key: str) -> dict[str, str]:
    """The key as written, and the encodings a careless log line might use."""
    raw = key.encode()
    return {"as is": key, "hex": raw.hex(), "base64": base64.b64encode(raw).decode()}


@pytest.fixture(scope="module")
def secret_stack(make_stack):
    """A stack of its own: its keys are this module's alone."""
    s = make_stack()
    try:
        yield s
    finally:
        s.stop()


def test_keys_appear_nowhere_but_in_envoys_environment(secret_stack):
    s = secret_stack
    keys = {"CONSENTRY_HASH_KEY": s.hash_key, "CONSENTRY_SUBJECT_KEY": s.subject_key}
    assert s.hash_key != s.subject_key and min(map(len, keys.values())) >= 32

    # The keys are where they belong: in the Envoy process's environment.
    environ = Path(f"/proc/{s.envoy.proc.pid}/environ").read_bytes().split(b"\0")
    for name, key in keys.items():
        assert f"{name}={key}".encode() in environ, f"{name} is not in Envoy's environment"

    responses: list[bytes] = []
    batch = customers()

    # 1. Request direction: analytics gets hashed ids; the decision names subjects.
    r, rid = s.send("analytics", "POST", "/v1/events", caller="profile", body=batch)
    assert r.status == 200, r.text()
    responses.append(r.body)
    got = received_json(s, "analytics")
    want_ids = [pseudonym("h1:", s.hash_key, c["id"]) for c in batch["customers"]]
    assert [c.get("id") for c in got["customers"]] == want_ids, \
        "analytics did not get the ids hashed with this stack's hash key"
    d = decision(s, rid, "request")
    assert d["outcome"] == "modified", d
    subjects = d["subjects"]
    want_subjects = [pseudonym("s2:", s.subject_key, c["id"]) for c in batch["customers"]]
    assert subjects == want_subjects, \
        f"the decision's subject pseudonyms are not this stack's: {subjects}"

    # 2. Response direction: analytics reads the customers from profile.
    r, rid = s.send("profile", "GET", "/v1/customers", caller="analytics")
    assert r.status == 200, r.text()
    responses.append(r.body)
    assert [c["id"] for c in r.json()["customers"]] == want_ids
    assert decision(s, rid, "response")["outcome"] == "modified"

    # 3. Consent from the store (its answers are cached under subject pseudonyms).
    a, b = fresh_id(), fresh_id()
    s.services.store.set_data({a: {"marketing_email": True}}, merge=True)
    r, rid = s.send("marketing", "POST", "/v1/campaigns", caller="profile",
                    body={"customers": [record(a), record(b)]})
    assert r.status == 200, r.text()
    responses.append(r.body)
    assert s.services.store.stats()["lookups"] >= 1
    assert decision(s, rid, "request")["outcome"] == "modified"

    # 4. Local replies: a block and an uninspectable body.
    r, rid = s.send("analytics", "POST", "/v1/events", caller="profile",
                    body=customers_with_iban())
    assert r.status == 403, r.text()
    responses.append(r.body)
    r, rid = s.send("analytics", "POST", "/v1/events", caller="profile", body=b"{nope",
                    headers={"content-type": "application/json"})
    assert r.status == 400, r.text()
    responses.append(r.body)
    s.decisions(rid, timeout=5)          # the last exchange is logged ...
    s.access_entries(rid, timeout=5)     # ... and in the access log

    # Everything that can be read, by where it comes from.
    places: dict[str, str] = {}
    for path in ADMIN_PATHS:
        resp = s.envoy.admin("GET", path)
        assert resp.status == 200, f"admin {path} answered {resp.status}: {resp.text()[:200]}"
        places[f"admin {path}"] = resp.text()
    assert "host_env_keys" in places["admin /config_dump"], \
        "the config dump does not show the wasm VM's environment settings"
    assert "acme-customer-data" in places["admin /config_dump"], \
        "the config dump does not show the plugin configuration"
    assert "wasmcustom.consentry" in places["admin /stats"]
    places["Envoy's log"] = s.envoy.log_text()
    places["the access log"] = s.access_log_path.read_text()
    places["the decision records"] = json.dumps(s.decisions())
    places["the bootstrap file"] = s.config_path.read_text()
    for i, body in enumerate(responses):
        places[f"response body {i}"] = body.decode("utf-8", "replace")
    for name, upstream in s.services.upstreams.items():
        places[f"what {name} received"] = json.dumps(upstream.recorded())
    places["what the consent store received"] = json.dumps(s.services.store.stats())
    assert "consentry.decision " in places["Envoy's log"]
    assert s.decisions(), "no decision was logged"

    leaks = [f"{name} ({form}) in {where}"
             for name, key in keys.items() for form, text in _forms(key).items()
             for where, content in places.items() if text in content]
    assert not leaks, "a key leaked:\n  " + "\n  ".join(leaks)


def test_the_keys_are_not_on_envoys_command_line(secret_stack):
    """Nor in Envoy's arguments (visible to every local user in `ps`)."""
    cmdline = Path(f"/proc/{secret_stack.envoy.proc.pid}/cmdline").read_bytes().decode()
    for key in (secret_stack.hash_key, secret_stack.subject_key):
        assert key not in cmdline
    assert str(secret_stack.config_path) in cmdline
    assert ce.HASH_KEY_ENV not in cmdline
