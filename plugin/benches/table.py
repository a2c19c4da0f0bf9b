#!/usr/bin/env python3
"""Renders the tables of plugin/benches/RESULTS.md from criterion's output
(target/criterion, written by `cargo bench -p consentry --bench engine` and
`cargo bench -p consentry-harness --bench wasm`).

Times are criterion's median of the per-iteration sample times; `min` is the fastest
sample, the least disturbed one on a shared machine. Usage: table.py [target/criterion]
"""
import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
SIZES = ["100B", "1KB", "16KB", "256KB", "1MB"]
POLICIES = ["p5", "p10-example", "p50", "p500"]

res = {}
for b in root.glob("**/new/benchmark.json"):
    meta = json.loads(b.read_text())
    est = json.loads((b.parent / "estimates.json").read_text())
    sample = json.loads((b.parent / "sample.json").read_text())
    per_iter = [t / n for t, n in zip(sample["times"], sample["iters"])]
    tp = meta.get("throughput") or {}
    res[meta["full_id"]] = {
        "median": est["median"]["point_estimate"],
        "min": min(per_iter),
        "bytes": tp.get("Bytes") or tp.get("BytesDecimal"),
    }


def t(ns):
    if ns is None:
        return "-"
    for unit, div in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= div:
            return f"{ns / div:.3g} {unit}"
    return f"{ns:.3g} ns"


def mibs(r):
    if not r or not r["bytes"]:
        return "-"
    return f"{r['bytes'] / (r['median'] / 1e9) / (1 << 20):.1f}"


def ratio(a, b, key="median"):
    if not a or not b:
        return "-"
    return f"{a[key] / b[key]:.2f}"


def g(i):
    return res.get(i)


out = []
out.append("### Engine (plan_body + judge_body) vs the serde_json floor\n")
out.append("| body | bytes | policy | recipient | engine median | MiB/s | engine min | serde floor median | floor MiB/s | engine / floor | vs p5 (same recipient) |")
out.append("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for s in SIZES:
    floor = g(f"engine/{s}/serde_floor")
    for p in POLICIES:
        for to in ("analytics", "profile"):
            r = g(f"engine/{s}/{p}/{to}")
            if not r:
                continue
            base = g(f"engine/{s}/p5/{to}")
            out.append(
                f"| {s} | {r['bytes']} | {p} | {to} | {t(r['median'])} | {mibs(r)} | {t(r['min'])} | "
                f"{t(floor and floor['median'])} | {mibs(floor)} | {ratio(r, floor)} | {ratio(r, base)} |"
            )

out.append("\n### p500 vs p5 (median and min)\n")
out.append("| body | recipient | p500 / p5 median | p500 / p5 min | p50 / p5 median |")
out.append("| --- | --- | ---: | ---: | ---: |")
for s in SIZES:
    for to in ("analytics", "profile"):
        a, b, c = g(f"engine/{s}/p500/{to}"), g(f"engine/{s}/p5/{to}"), g(f"engine/{s}/p50/{to}")
        out.append(f"| {s} | {to} | {ratio(a, b)} | {ratio(a, b, 'min')} | {ratio(c, b)} |")

out.append("\n### Decision log: `decision_log(..).to_json()` (analytics; throughput is the log line's bytes)\n")
out.append("| body | policy | log line bytes | median | MiB/s | log / engine (same message) |")
out.append("| --- | --- | ---: | ---: | ---: | ---: |")
for s in SIZES:
    for p in POLICIES:
        r = g(f"log/{s}/{p}/analytics")
        if r:
            out.append(f"| {s} | {p} | {r['bytes']} | {t(r['median'])} | {mibs(r)} | {ratio(r, g(f'engine/{s}/{p}/analytics'))} |")

out.append("\n### Through the .wasm (example policy, analytics) vs native\n")
out.append("| body | native message (exchange+plan+judge+log) | wasm `vm` (Vm::run) | wasm `replay` (Runner::run) | vm MiB/s | vm / native | replay / native |")
out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for s in SIZES:
    n, v, rp = g(f"message/{s}/p10-example/analytics"), g(f"wasm/{s}/vm/analytics"), g(f"wasm/{s}/replay/analytics")
    if not (v or rp):
        continue
    out.append(f"| {s} | {t(n and n['median'])} | {t(v and v['median'])} | {t(rp and rp['median'])} | {mibs(v)} | {ratio(v, n)} | {ratio(rp, n)} |")

out.append("\n### Harness start-up and policy compile\n")
out.append("| what | median | min |")
out.append("| --- | ---: | ---: |")
for i in ("harness/plugin_load", "harness/plugin_start"):
    r = g(i)
    if r:
        out.append(f"| `{i}` | {t(r['median'])} | {t(r['min'])} |")
for p in POLICIES:
    r = g(f"compile/{p}")
    if r:
        out.append(f"| `compile/{p}` (native `Policy::compile`, {r['bytes']} B of policy) | {t(r['median'])} | {t(r['min'])} |")

print("\n".join(out))
