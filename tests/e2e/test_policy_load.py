"""A policy the filter cannot use never half-loads: Envoy refuses the configuration and
its log lists every error, with where it is and what to do."""

from __future__ import annotations

import json
import subprocess

import consentry_env as ce
import services as svc


def _envoy_with(tmp_path, policy_text: str, *, hash_key: str | None = None,
                keys: dict | None = None):
    """`envoy --mode validate` (which loads the .wasm and its policy) with the bootstrap
    and, in Envoy's environment, `keys` (default: random keys, or `hash_key`)."""
    ports = dict(zip(svc.ALL_SERVICES, ce.free_ports(len(svc.ALL_SERVICES))))
    admin, listener = ce.free_ports(2)
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(ce.render_bootstrap(
        admin_port=admin, listener_port=listener, ports=ports,
        access_log_path=tmp_path / "access.log", wasm=True, wasm_path=ce.find_wasm(),
        policy_text=policy_text))
    if keys is None:
        keys = ce.key_env(hash_key=hash_key)
    return subprocess.run([str(ce.find_envoy()), "--mode", "validate", "-c", str(cfg),
                           "--disable-hot-restart", "--log-level", "info"],
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env=ce.envoy_environment(keys))


def _policy() -> dict:
    return json.loads(ce.DEFAULT_POLICY.read_text())


def test_every_policy_error_is_in_envoys_log_and_the_config_is_refused(tmp_path):
    p = _policy()
    del p["purposes"]["marketing.email"]["consent_key"]
    p["services"]["billing"]["purposes"].append("no.such.purpose")
    p["messages"][0]["fields"][1]["path"] = "$.name[?@ == 'x']"
    r = _envoy_with(tmp_path, json.dumps(p))
    out = r.stdout + r.stderr
    assert r.returncode != 0, f"Envoy accepted a broken policy:\n{out[-3000:]}"
    errors = [line for line in out.splitlines() if "consentry: policy error:" in line]
    assert len(errors) == 3, "\n".join(errors) or out[-3000:]
    assert any("/purposes/marketing.email/basis" in e and "consent_key" in e for e in errors)
    assert any("/services/billing/purposes/" in e and "not defined" in e for e in errors)
    assert any("/messages/0/fields/1/path" in e and "filter" in e for e in errors)
    assert "policy rejected with 3 error(s)" in out


def test_json_syntax_errors_name_the_line(tmp_path):
    text = ce.DEFAULT_POLICY.read_text().replace('"mode": "enforce",', '"mode": "enforce",,', 1)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if '"mode"' in l)
    r = _envoy_with(tmp_path, text)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert f"line {line}, column" in out and "not valid JSON" in out, out[-3000:]


def test_a_key_too_short_to_be_a_key_refuses_the_policy(tmp_path):
    r = _envoy_with(tmp_path, ce.DEFAULT_POLICY.read_text(), hash_key="short")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "CONSENTRY_HASH_KEY is shorter than 16 bytes" in out, out[-3000:]


def test_the_example_policy_loads(tmp_path):
    r = _envoy_with(tmp_path, ce.DEFAULT_POLICY.read_text())
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "policy `acme-customer-data` loaded" in out


def test_keys_come_from_envoys_environment(tmp_path):
    """The bootstrap holds no key (host_env_keys): without the variables in Envoy's own
    environment the example policy, which hashes and names subjects, is refused; with
    them (test_the_example_policy_loads) it loads."""
    for missing in ce.KEY_ENV_NAMES:
        keys = {k: ce.random_key() for k in ce.KEY_ENV_NAMES if k != missing}
        r = _envoy_with(tmp_path, ce.DEFAULT_POLICY.read_text(), keys=keys)
        out = r.stdout + r.stderr
        assert r.returncode != 0, f"Envoy loaded the policy without {missing}:\n{out[-3000:]}"
        assert missing in out, f"the refusal does not name {missing}:\n{out[-3000:]}"
        assert "policy `acme-customer-data` loaded" not in out
