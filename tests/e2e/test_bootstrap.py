"""The shipped Envoy and Istio configuration: renders, validates with the real Envoy
(which loads the real .wasm and its policy in validate mode), and stays in step with the
example policy."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import consentry_env as ce
import services as svc
from helpers import customers, only_request


def _render(tmp_path, wasm: bool, pki: ce.TestPKI | None, path_hygiene: bool = True) -> str:
    """The bootstrap as the tests run it: with the mTLS listener when given a test CA."""
    ports = dict(zip(svc.ALL_SERVICES, ce.free_ports(len(svc.ALL_SERVICES))))
    admin, listener, mtls_port = ce.free_ports(3)
    mtls = pki is not None
    return ce.render_bootstrap(
        admin_port=admin, listener_port=listener, ports=ports,
        access_log_path=tmp_path / "access.log", wasm=wasm,
        wasm_path=ce.find_wasm() if wasm else None,
        policy_text=ce.DEFAULT_POLICY.read_text() if wasm else None,
        mtls_port=mtls_port if mtls else None,
        tls_files=pki.bootstrap_files() if mtls else None, path_hygiene=path_hygiene)


def _uncommented(text: str) -> str:
    """The YAML without its comment lines (the template's comments name the options)."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _validate(tmp_path, text: str, name: str):
    """`envoy --mode validate` (it loads the .wasm and the policy), with random keys in
    Envoy's environment as the bootstrap's host_env_keys expects."""
    cfg = tmp_path / name
    cfg.write_text(text)
    p = subprocess.run([str(ce.find_envoy()), "--mode", "validate", "-c", str(cfg),
                        "--disable-hot-restart", "--log-level", "warn"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                       env=ce.envoy_environment(ce.key_env()))
    assert p.returncode == 0, f"envoy --mode validate failed:\n{p.stdout}\n{p.stderr}"


def test_bootstrap_with_consentry_validates(tmp_path, pki):
    text = _render(tmp_path, wasm=True, pki=pki)
    assert "envoy.filters.http.wasm" in text
    assert "envoy.wasm.runtime.v8" in text
    assert "name: ingress_mtls" in text and "require_client_certificate: true" in text
    _validate(tmp_path, text, "envoy.yaml")


def test_mtls_listener_shares_the_connection_manager():
    """ingress_mtls reuses the plain listener's HCM (YAML alias), so the two cannot drift."""
    template = ce.TEMPLATE.read_text()
    assert template.count("&ingress_hcm") == 1
    assert template.count("*ingress_hcm") == 1
    assert template.count("envoy.filters.network.http_connection_manager") == 1
    assert len(re.findall(r"^[ \t]*# BEGIN mtls$", template, re.M)) == 1
    assert len(re.findall(r"^[ \t]*# END mtls$", template, re.M)) == 1


def test_bootstrap_without_tls_files_has_no_mtls_listener(tmp_path):
    # test_policy_load validates this variant with the real Envoy.
    text = _render(tmp_path, wasm=True, pki=None)
    assert "name: ingress_mtls" not in text
    assert "DownstreamTlsContext" not in text and "*ingress_hcm" not in text


def test_passthrough_bootstrap_validates(tmp_path, pki):
    text = _render(tmp_path, wasm=False, pki=pki)
    assert "envoy.filters.http.wasm" not in text
    assert "CONSENTRY_HASH_KEY" not in _uncommented(text)
    assert "envoy.filters.http.buffer" in text and "envoy.filters.http.router" in text
    assert "name: ingress_mtls" in text
    _validate(tmp_path, text, "passthrough.yaml")


def test_keys_are_neither_in_the_policy_nor_in_the_bootstrap(tmp_path):
    """The VM takes the keys from Envoy's process environment (host_env_keys): the
    rendered bootstrap names the variables and holds no key material (no key_values,
    whose values Envoy's admin /config_dump would print)."""
    hash_key, subject_key = ce.random_key(), ce.random_key()
    assert len(hash_key) == 32 and hash_key != subject_key
    text = ce.render_bootstrap(
        admin_port=1, listener_port=2, ports={s: 3 for s in svc.ALL_SERVICES},
        access_log_path="/dev/null", wasm=True, wasm_path="/x.wasm",
        policy_text=ce.DEFAULT_POLICY.read_text())
    value = re.search(r'^\s*value: (".*")$', text, re.M).group(1)
    policy_text = json.loads(value)
    assert json.loads(policy_text) == json.loads(ce.DEFAULT_POLICY.read_text())
    assert re.search(r"^\s*host_env_keys: \[CONSENTRY_HASH_KEY, CONSENTRY_SUBJECT_KEY\]$",
                     text, re.M), "the wasm VM does not take the keys from Envoy's environment"
    assert "key_values" not in _uncommented(text)
    assert not re.search(r"\$\{(hash|subject)_key\}", ce.TEMPLATE.read_text()), \
        "the template still has a placeholder for a key"
    policy = json.loads(policy_text)
    assert (policy["keys"]["hash_key_env"], policy["keys"]["subject_key_env"]) == ce.KEY_ENV_NAMES


def test_bootstrap_without_path_hygiene_validates(tmp_path, pki):
    """path_hygiene=False drops exactly the connection manager's path options."""
    on = _render(tmp_path, wasm=True, pki=pki)
    off = _render(tmp_path, wasm=True, pki=pki, path_hygiene=False)
    for option in ce.PATH_HYGIENE_OPTIONS:
        assert len(re.findall(rf"^\s*{re.escape(option)}$", on, re.M)) == 1, option
        assert option.split(":")[0] not in _uncommented(off), option
    marker = re.compile(r"^[ \t]*# (BEGIN|END) path-hygiene$", re.M)
    assert len(marker.findall(on)) == 2 and not marker.findall(off)
    _validate(tmp_path, off, "no-path-hygiene.yaml")


# The path as a client writes it, and as the upstream gets it with path hygiene on.
ODD_PATH, CANONICAL_PATH = "//v1/./customers", "/v1/customers"
ENCODED_SLASH_PATH = "/v1/customers%2F42"


def test_with_path_hygiene_envoy_forwards_only_canonical_paths(stack):
    """The session's stack (path hygiene on): Envoy merges slashes and removes dot
    segments before consentry and the router see the path, and refuses an encoded slash
    itself (400, nothing forwarded)."""
    r, rid = stack.send("unknown", "GET", ODD_PATH)
    assert r.status == 200, r.text()
    assert only_request(stack, "unknown")["path"] == CANONICAL_PATH
    (entry,) = stack.access_entries(rid)
    assert entry["path"] == CANONICAL_PATH, entry
    stack.clear()

    before = stack.stats("http.ingress.downstream_rq_failed_path_normalization")
    r, rid = stack.send("unknown", "GET", ENCODED_SLASH_PATH)
    assert r.status == 400, (r.status, r.text()[:300])
    assert stack.recorded("unknown") == [], "a path with an encoded slash was forwarded"
    (entry,) = stack.access_entries(rid)
    assert entry["response_code"] == 400 and entry["upstream_cluster"] in (None, "-"), entry
    after = stack.stats("http.ingress.downstream_rq_failed_path_normalization")
    name = "http.ingress.downstream_rq_failed_path_normalization"
    assert after.get(name, 0) - before.get(name, 0) == 1, (before, after)


def test_without_path_hygiene_envoy_forwards_paths_as_they_came(make_stack):
    """path_hygiene=False (consentry's own normalisation alone): Envoy forwards every
    spelling unchanged and refuses none, so only the filter stands between them and the
    upstream. Checked on a route no binding covers (the filter lets it pass whatever its
    spelling) and, for the odd spelling of a covered route, on what the upstream got (how
    the filter judges those is test_route_spellings.py's business)."""
    s = make_stack(path_hygiene=False)
    name = "http.ingress.downstream_rq_failed_path_normalization"
    try:
        before = s.stats(name).get(name, 0)
        for path in ("//v1/./metrics", "/v1/x/../metrics", "/v1/metrics%2F42"):
            s.clear()
            r, _ = s.send("unknown", "GET", path)
            assert r.status == 200, (path, r.status, r.text()[:300])
            assert only_request(s, "unknown")["path"] == path
        s.clear()
        s.send("unknown", "GET", ODD_PATH)
        assert only_request(s, "unknown")["path"] == ODD_PATH
        assert s.stats(name).get(name, 0) == before, "Envoy refused a path itself"
    finally:
        s.stop()


def test_every_cluster_of_the_policy_is_routed():
    policy = json.loads(ce.DEFAULT_POLICY.read_text())
    template = ce.TEMPLATE.read_text()
    for name, service in policy["services"].items():
        for cluster in service.get("clusters", []):
            assert re.search(rf"name: {re.escape(cluster)},", template), cluster
            assert f"route: {{ cluster: {cluster}," in template, cluster
        for authority in service.get("authorities", []):
            assert f'domains: ["{authority}"]' in template, authority
    assert f"name: {policy['consent']['store']['cluster']}," in template


def test_istio_wasmplugin_carries_the_example_policy():
    text = ce.ISTIO_WASMPLUGIN.read_text()
    assert ce.istio_plugin_config(text) == json.loads(ce.DEFAULT_POLICY.read_text()), \
        "envoy/istio/wasmplugin.yaml is out of step: run " \
        "`python3 tests/e2e/consentry_env.py sync-istio`"
    assert "kind: WasmPlugin" in text and "apiVersion: extensions.istio.io/v1alpha1" in text
    assert re.search(r"^  failStrategy: FAIL_CLOSE$", text, re.M)
    assert re.search(r"^  phase: (AUTHN|AUTHZ|STATS)$", text, re.M)
    # The keys come from the proxy's environment (Envoy's host_env_keys), never inline
    # (key_values, which /config_dump prints).
    env = re.search(r"^  vmConfig:\n    env:\n((?:    [ -].*\n)+)", text, re.M)
    assert env, "the WasmPlugin has no vmConfig.env"
    entries = re.findall(r"^    - name: (\S+)\n      valueFrom: (\S+)$", env.group(1), re.M)
    assert entries == [(k, "HOST") for k in ce.KEY_ENV_NAMES], env.group(1)
    assert "value:" not in env.group(1) and "INLINE" not in _uncommented(text)


def test_passthrough_stack_forwards_unchanged(make_stack):
    """The load-comparison baseline really is a transparent proxy."""
    s = make_stack(wasm=False)
    try:
        batch = customers()
        r, _ = s.send("analytics", "POST", "/v1/events", caller="profile", body=batch)
        assert r.status == 200
        assert json.loads(s.recorded("analytics")[0]["body"]) == batch
        s.clear()
        r, _ = s.send("analytics", "POST", "/v1/events", body=batch)
        assert r.status == 200
        assert json.loads(s.recorded("analytics")[0]["body"]) == batch
    finally:
        s.stop()


def test_render_command_line(tmp_path):
    out = tmp_path / "cli.yaml"
    p = subprocess.run([sys.executable, str(ce.HERE / "consentry_env.py"), "render",
                        "--passthrough", "--out", str(out), "--tls-dir", str(tmp_path / "tls")],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "tls" / "ca.crt").is_file() and "ingress_mtls" in out.read_text()
    _validate(tmp_path, out.read_text(), "cli-validated.yaml")


def test_services_run_standalone(tmp_path):
    """`python3 tests/e2e/services.py --config ports.json` serves and stops on SIGTERM."""
    cfg = tmp_path / "ports.json"
    cfg.write_text(json.dumps({"analytics": 0}))
    proc = subprocess.Popen([sys.executable, str(ce.HERE / "services.py"), "--config", str(cfg),
                             "--write-config"], stdout=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        ports = json.loads(proc.stdout.readline())
        assert set(ports) == set(svc.ALL_SERVICES)
        assert json.loads(cfg.read_text()) == ports
        r = ce.http_request(ports["analytics"], "POST", "/v1/events", body={"a": 1},
                            headers={"x-test": "1"})
        assert r.status == 200 and r.json() == {"ok": True}
        rec = ce.http_request(ports["analytics"], "GET", "/_recorded").json()
        assert len(rec) == 1 and json.loads(rec[0]["body"]) == {"a": 1}
        r = ce.http_request(ports["consent_store"], "POST", "/v1/consents:lookup",
                            body={"subjects": ["c-1003", "nobody"]})
        assert r.json() == {"consents": {"c-1003": {"marketing_email": True,
                                                    "social_profiling": False}}}
        assert ce.http_request(ports["consent_store"], "GET", "/_stats").json()["lookups"] == 1
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
