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
from helpers import customers


def _render(tmp_path, wasm: bool, pki: ce.TestPKI | None) -> str:
    """The bootstrap as the tests run it: with the mTLS listener when given a test CA."""
    ports = dict(zip(svc.ALL_SERVICES, ce.free_ports(len(svc.ALL_SERVICES))))
    admin, listener, mtls_port = ce.free_ports(3)
    mtls = pki is not None
    return ce.render_bootstrap(
        admin_port=admin, listener_port=listener, ports=ports,
        access_log_path=tmp_path / "access.log", wasm=wasm,
        wasm_path=ce.find_wasm() if wasm else None,
        policy_text=ce.DEFAULT_POLICY.read_text() if wasm else None,
        hash_key=ce.random_key(), subject_key=ce.random_key(),
        mtls_port=mtls_port if mtls else None,
        tls_files=pki.bootstrap_files() if mtls else None)


def _validate(tmp_path, text: str, name: str):
    cfg = tmp_path / name
    cfg.write_text(text)
    p = subprocess.run([str(ce.find_envoy()), "--mode", "validate", "-c", str(cfg),
                        "--disable-hot-restart", "--log-level", "warn"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
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
    assert "CONSENTRY_HASH_KEY" not in text
    assert "envoy.filters.http.buffer" in text and "envoy.filters.http.router" in text
    assert "name: ingress_mtls" in text
    _validate(tmp_path, text, "passthrough.yaml")


def test_keys_live_in_the_vm_environment_not_the_policy(tmp_path):
    hash_key, subject_key = ce.random_key(), ce.random_key()
    assert len(hash_key) == 32 and hash_key != subject_key
    text = ce.render_bootstrap(
        admin_port=1, listener_port=2, ports={s: 3 for s in svc.ALL_SERVICES},
        access_log_path="/dev/null", wasm=True, wasm_path="/x.wasm",
        policy_text=ce.DEFAULT_POLICY.read_text(), hash_key=hash_key, subject_key=subject_key)
    value = re.search(r'^\s*value: (".*")$', text, re.M).group(1)
    policy_text = json.loads(value)
    assert json.loads(policy_text) == json.loads(ce.DEFAULT_POLICY.read_text())
    assert hash_key not in policy_text and subject_key not in policy_text
    assert f"CONSENTRY_HASH_KEY: {json.dumps(hash_key)}" in text
    assert f"CONSENTRY_SUBJECT_KEY: {json.dumps(subject_key)}" in text


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
    assert "valueFrom: HOST" in text
    assert "CONSENTRY_HASH_KEY" in text and "CONSENTRY_SUBJECT_KEY" in text


def test_passthrough_stack_forwards_unchanged(make_stack):
    """The load-comparison baseline really is a transparent proxy."""
    s = make_stack(wasm=False)
    try:
        batch = customers()
        r, _ = s.send("analytics", "POST", "/v1/events", caller="profile", body=batch)
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
