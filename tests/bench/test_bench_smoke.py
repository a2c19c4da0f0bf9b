"""Smoke test of envoy/bench/run: `--smoke` (1 s per measurement, no warm-up, one start,
1 KB per workload) with `--json`, and the shape of what it writes.

It checks that every configuration x workload x size row is there, that every figure
that must be a positive finite number is one, that the checks against the recording
upstream ran for every configuration and workload, and that every target is computed
and marked; never how fast anything is (a 1 s run on a shared machine means nothing).

Like tests/e2e, nothing here skips: a missing Envoy, .wasm, do-nothing module or wrk is
an error saying how to get it. The bench is run with --no-build: scripts/test builds
both modules first (build_wasm, build_bench_wasm in scripts/lib.sh).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "envoy" / "bench" / "run"
CONFIGS = ["passthrough", "buffer", "noop-wasm", "consentry", "consentry-exempt",
           "consentry-nohash", "lua-gsub"]
CONSENTRY = {"consentry", "consentry-exempt", "consentry-nohash"}
REWRITING = CONSENTRY | {"lua-gsub"}
WORKLOADS = [("covered", 1024), ("uncovered", 1024), ("open", 1024)]
TIMEOUT_S = 300


def _sigterm(signum, frame):
    # `timeout` in scripts/test sends SIGTERM: unwind, so the bench is stopped by its pid.
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _sigterm)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-smoke")
    json_path, md_path = out / "bench.json", out / "bench.md"
    cmd = [sys.executable, str(BENCH), "--smoke", "--no-build", "--json", str(json_path),
           "--out", str(md_path)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=TIMEOUT_S)
    except BaseException:
        # Timeout or Ctrl-C: SIGTERM the bench (it stops its Envoys and wrk by pid).
        p.send_signal(signal.SIGTERM)
        try:
            p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
        raise
    if p.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {p.returncode}:\n{stderr[-6000:]}", pytrace=False)
    assert json_path.is_file(), f"--json wrote no {json_path}:\n{stderr[-3000:]}"
    return json.loads(json_path.read_text()), md_path.read_text(), stdout


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def non_negative(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def test_header(smoke):
    doc, _md, _out = smoke
    assert doc["format"] == "consentry-bench/1"
    assert doc["smoke"] is True
    assert doc["configurations"] == CONFIGS
    assert positive(doc["clk_tck"]) and doc["clk_tck"] == os.sysconf("SC_CLK_TCK")
    s = doc["settings"]
    assert s["duration_s"] == 1 and s["warmup_s"] == 0 and s["starts"] == 1
    assert [(w["workload"], w["size"]) for w in doc["workloads"]] == WORKLOADS
    for w in doc["workloads"]:
        assert positive(w["body_bytes"]) and positive(w["records"]), w


def test_every_row_present_once(smoke):
    doc, _md, _out = smoke
    keys = [(r["configuration"], r["workload"], r["size"]) for r in doc["rows"]]
    want = [(c, w, s) for w, s in WORKLOADS for c in CONFIGS]
    assert sorted(keys) == sorted(want), f"rows {keys}"
    assert len(set(keys)) == len(keys)


POSITIVE = ("requests", "proxy_requests", "duration_s", "requests_per_s", "p50_us", "p90_us",
            "p99_us", "max_us", "cpu_ticks", "cpu_us_per_request", "cpu_utilisation",
            "body_bytes", "records", "upstream_body_bytes", "upstream_bytes_per_request")


def test_row_numbers(smoke):
    doc, _md, _out = smoke
    bad = []
    for r in doc["rows"]:
        where = f"{r['configuration']} {r['workload']} {r['size']}"
        bad += [f"{where}: {k} = {r.get(k)!r}" for k in POSITIVE if not positive(r.get(k))]
        for k in ("cpu_to", "rps_to"):
            if set(r.get(k, {})) != {"passthrough", "buffer", "noop-wasm", "lua-gsub"}:
                bad.append(f"{where}: {k} = {r.get(k)!r}")
                continue
            bad += [f"{where}: {k}[{b}] = {v!r}" for b, v in r[k].items() if not positive(v)]
            if r["configuration"] in r[k] and r[k][r["configuration"]] != 1:
                bad.append(f"{where}: {k} against itself is {r[k][r['configuration']]!r}")
        if positive(r.get("p50_us")) and positive(r.get("p99_us")) and r["p50_us"] > r["p99_us"]:
            bad.append(f"{where}: p50 {r['p50_us']} above p99 {r['p99_us']}")
        if positive(r.get("requests")) and positive(r.get("proxy_requests")) \
                and r["proxy_requests"] < r["requests"]:
            bad.append(f"{where}: the proxy counted fewer requests than wrk completed")
        for k in ("decision_log_bytes", "decision_log_lines", "decision_log_bytes_per_request"):
            if not non_negative(r.get(k)):
                bad.append(f"{where}: {k} = {r.get(k)!r}")
        if r["configuration"] in CONSENTRY and r["workload"] == "covered":
            # --log-level info: a decision line per covered request, and every one modified
            if not (positive(r.get("decision_log_bytes_per_request"))
                    and r.get("decision_log_lines", 0) >= r["requests"]):
                bad.append(f"{where}: decision log {r.get('decision_log_lines')} lines, "
                           f"{r.get('decision_log_bytes_per_request')} B/request")
            if not r.get("modified", 0) >= r["requests"]:
                bad.append(f"{where}: modified {r.get('modified')} of {r['requests']}")
        elif r["configuration"] not in CONSENTRY and r.get("decision_log_bytes") != 0:
            bad.append(f"{where}: decision log bytes {r.get('decision_log_bytes')} without consentry")
        if r.get("checked") is not True:
            bad.append(f"{where}: not checked")
        if r["configuration"] in REWRITING and r["workload"] == "covered":
            if not r.get("upstream_body_bytes", 0) < r["body_bytes"]:
                bad.append(f"{where}: the upstream got {r.get('upstream_body_bytes')} B of "
                           f"{r['body_bytes']}: not rewritten")
        elif r.get("upstream_body_bytes") != r["body_bytes"]:
            bad.append(f"{where}: the upstream got {r.get('upstream_body_bytes')} B of {r['body_bytes']}")
    assert not bad, "\n".join(bad)


def test_checks_ran(smoke):
    doc, _md, _out = smoke
    assert set(doc["checks"]) == set(CONFIGS)
    for name, per in doc["checks"].items():
        assert set(per) == {f"{w}-{s}" for w, s in WORKLOADS}, (name, per)
        for key, c in per.items():
            assert c["ok"] is True, (name, key, c)
            assert positive(c["sent_bytes"]) and positive(c["received_bytes"]), (name, key, c)
            rewritten = name in REWRITING and c["kind"] == "covered"
            assert c["verified"].startswith("rewritten" if rewritten else "unchanged"), (name, key, c)
            assert (c["received_bytes"] < c["sent_bytes"]) if rewritten else \
                (c["received_bytes"] == c["sent_bytes"]), (name, key, c)


def test_targets_computed_and_marked(smoke):
    doc, _md, _out = smoke
    got = {(t["configuration"], t["baseline"], t["workload"], t["size"]) for t in doc["targets"]}
    assert got == {("consentry", "noop-wasm", "covered", 1024),
                   ("consentry-nohash", "noop-wasm", "covered", 1024),
                   ("consentry", "lua-gsub", "covered", 1024),
                   ("consentry", "passthrough", "uncovered", 1024),
                   ("consentry-exempt", "passthrough", "uncovered", 1024)}, got
    for t in doc["targets"]:
        assert t["metric"] == "proxy CPU per request"
        assert positive(t["value"]) and positive(t["limit"]) and t["op"] in ("<=", ">="), t
        assert isinstance(t["met"], bool), t
        assert t["met"] == (t["value"] <= t["limit"] if t["op"] == "<=" else t["value"] >= t["limit"]), t


def test_start_to_ready(smoke):
    doc, _md, _out = smoke
    assert set(doc["start_to_ready_ms"]) == set(CONFIGS)
    for name, ts in doc["start_to_ready_ms"].items():
        assert len(ts) == 1 and all(positive(t) for t in ts), (name, ts)


def test_memory(smoke):
    doc, md, _out = smoke
    assert set(doc["memory_kib"]) == set(CONFIGS)
    for name, m in doc["memory_kib"].items():
        assert set(m) == {"ready_kib", "peak_kib"}, (name, m)
        assert 0 < m["ready_kib"] <= m["peak_kib"], (name, m)
    assert "Proxy memory (resident" in md


def test_markdown_report(smoke):
    doc, md, stdout = smoke
    # print() ends the printed report with one more newline than the file.
    assert md.rstrip("\n") == stdout.rstrip("\n"), \
        "the report printed and the one written with --out differ"
    assert "## Targets" in md
    for t in doc["targets"]:
        assert t["target"] in md
    for name in CONFIGS:
        assert f"| {name} |" in md, name
