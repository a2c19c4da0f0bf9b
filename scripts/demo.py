#!/usr/bin/env python3
"""The consentry demo: real Envoy, the real consentry .wasm, the example policy
(policies/acme-customers.json) and small recording services on 127.0.0.1.

Run it through scripts/demo, which installs and builds what this needs first. For each
illustrative exchange it prints what was sent, what the recipient actually received,
the status, and consentry's decision log; at the end, consentry's counters from Envoy's
/stats. Stops everything on exit, Ctrl-C or error.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import consentry_env as ce  # noqa: E402
import services as svc  # noqa: E402

COLOR = sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def bold(s: str) -> str:
    return f"\033[1m{s}\033[0m" if COLOR else s


def dim(s: str) -> str:
    return f"\033[2m{s}\033[0m" if COLOR else s


def status_txt(code: int) -> str:
    s = str(code)
    if not COLOR:
        return s
    return f"\033[{32 if code < 300 else 31}m{s}\033[0m"


def pretty(obj, indent: int = 4) -> str:
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    return textwrap.indent(text, " " * indent)


def pretty_body(raw: bytes | str, indent: int = 4) -> str:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if not raw:
        return " " * indent + dim("(empty)")
    try:
        return pretty(json.loads(raw), indent)
    except ValueError:
        return textwrap.indent(raw[:2000], " " * indent)


def summarize_decision(d: dict) -> str:
    """The record's header, then its decision groups (format v2): one line per group,
    with its path templates, verdict, how many fields it stands for and which subjects
    (indexes into the record's `subjects`, which are keyed pseudonyms)."""
    head = (f"direction={d.get('direction')} recipient={d.get('recipient')} "
            f"caller={d.get('caller')} mode={d.get('mode')} outcome={d.get('outcome')}")
    if d.get("records"):
        head += f" records={d['records']} subjects={len(d.get('subjects', []))}"
    lines = [head]
    if d.get("detail"):
        lines.append(f"detail: {d['detail']}")
    for g in d.get("decisions", []):
        paths = ", ".join(g.get("paths", [])) or "-"
        basis = f"{g.get('purpose')} ({g.get('basis')})" if g.get("purpose") else ""
        ev = g.get("evidence") or ""
        extra = " ".join(x for x in (basis, f"evidence={ev}" if ev else "") if x)
        lines.append(f"  {paths:<28} {g.get('category', ''):<31} {g.get('action', ''):<6} "
                     f"{g.get('reason') or '':<10} n={g.get('n', 0):<3} "
                     f"subj {g.get('subjects', '-'):<6} {extra}".rstrip())
    return textwrap.indent("\n".join(lines), "    ")


SCENARIOS = [
    {
        "title": "marketing-email reads the customer batch from profile (response direction)",
        "explain": "The response goes back to the caller, marketing-email. Its only purpose, "
                   "marketing.email, rests on consent: name, e-mail and id pass only for "
                   "customers who opted in (in the record, or in the consent store for "
                   "c-1003); everything else is stripped, masked or pseudonymised.",
        "service": "profile", "method": "GET", "path": "/v1/customers",
        "caller": "marketing-email", "show": "response",
    },
    {
        "title": "profile sends the batch to analytics (request direction)",
        "explain": "analytics.reporting (legitimate interests) may receive demographics and "
                   "behaviour only: ids arrive hashed, names redacted, phones masked, "
                   "e-mail and address removed. The customer e-mail in a header and in the "
                   "query string is removed / redacted as well.",
        "service": "analytics", "method": "POST",
        "path": "/v1/events?email=alice.keller%40example.com&period=2026-11",
        "headers": {"x-customer-email": "alice.keller@example.com",
                    "x-customer-id": "c-1001"},
        "caller": "profile", "body_fixture": "customers.json", "show": "request",
    },
    {
        "title": "profile sends the batch to billing",
        "explain": "essential.billing (contract) needs name, e-mail, address and id; "
                   "legal.tax_records (legal obligation) covers the tax id. Phone numbers "
                   "and demographics are not billing's business.",
        "service": "billing", "method": "POST", "path": "/v1/invoices",
        "caller": "profile", "body_fixture": "customers.json", "show": "request",
    },
    {
        "title": "profile sends the batch to social enrichment",
        "explain": "marketing.social_enrichment needs the social_profiling consent: only "
                   "c-1002 and c-1004 gave it.",
        "service": "enrichment", "method": "POST", "path": "/v1/enrich",
        "caller": "profile", "body_fixture": "customers.json", "show": "request",
    },
    {
        "title": "a batch with a bank account (IBAN) sent to analytics is blocked",
        "explain": "user.financial.bank_account is bound with action block: a recipient "
                   "without a financial purpose gets a 403 and nothing at all.",
        "service": "analytics", "method": "POST", "path": "/v1/events",
        "caller": "profile", "body_fixture": "customers_with_iban.json", "show": "request",
    },
]


def run_scenario(stack: ce.Stack, n: int, sc: dict):
    print()
    print(bold(f"━━━ {n}. {sc['title']}"))
    print(textwrap.fill(sc["explain"], width=88, initial_indent="    ",
                        subsequent_indent="    "))
    body = None
    if sc.get("body_fixture"):
        body = (svc.FIXTURES / sc["body_fixture"]).read_text()
    headers = dict(sc.get("headers") or {})
    if body is not None:
        headers["content-type"] = "application/json"
    print()
    # The caller is identified as in a mesh, by its client certificate (SPIFFE id) on
    # Envoy's mTLS listener; no caller header is sent.
    print(bold("  request") + f"  {sc['method']} https://{ce.HOSTS[sc['service']]}{sc['path']}"
          f"   from {sc['caller']} (client certificate {ce.TEST_CLIENTS[sc['caller']]})")
    for k, v in headers.items():
        if k != "content-type":
            print(f"           {k}: {v}")
    if body is not None:
        print(dim(f"           body: {sc['body_fixture']} "
                  f"({len(json.loads(body)['customers'])} customers)"))

    stack.clear()
    r, rid = stack.send(sc["service"], sc["method"], sc["path"], caller=sc["caller"],
                        body=body, headers=headers)
    print(bold("  status ") + f"  {status_txt(r.status)}   request id {rid}")

    if sc["show"] == "request":
        rec = stack.recorded(sc["service"])
        if not rec:
            print(bold(f"  {sc['service']} received") + "  nothing (the message never left Envoy)")
        for q in rec:
            print(bold(f"  {sc['service']} received") + f"  {q['method']} {q['path']}")
            interesting = [(k, v) for k, v in q["headers"]
                           if k.lower().startswith(("x-customer", "x-consentry", "content-"))]
            for k, v in interesting:
                print(f"           {k}: {v}")
            print(pretty_body(q["body"]))
        if r.status >= 400:
            print(bold("  the sender got back"))
            print(pretty_body(r.body))
    else:
        print(bold(f"  {sc['caller']} got back"))
        print(pretty_body(r.body))

    decisions = stack.decisions(rid, timeout=3)
    print(bold("  decision log") + dim("  (Envoy log lines 'consentry.decision {json}')"))
    if not decisions:
        print("    (none)")
    for d in decisions:
        print(summarize_decision(d))


def main() -> int:
    stop_now = []

    def on_term(signum, frame):
        stop_now.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stack = ce.Stack()
    try:
        print(bold("consentry demo"))
        print(f"  envoy   {ce.find_envoy()}")
        print(f"  wasm    {ce.find_wasm()}")
        print(f"  policy  {ce.policy_path()}")
        stack.start()
        print(f"  Envoy listening on 127.0.0.1:{stack.listener_port}, mTLS on "
              f"127.0.0.1:{stack.mtls_port} (admin 127.0.0.1:{stack.admin_port}), services on "
              + ", ".join(f"{k}:{v}" for k, v in stack.services.ports.items()))
        print(f"  run directory {stack.run_dir} (envoy.yaml, envoy.log, access.log)")

        for i, sc in enumerate(SCENARIOS, 1):
            run_scenario(stack, i, sc)

        print()
        print(bold("━━━ counters in Envoy's /stats (wasmcustom.consentry.*)"))
        stats = stack.stats()
        if not stats:
            print("    (none)")
        width = max((len(k) for k in stats), default=0)
        for k, v in sorted(stats.items()):
            print(f"    {k:<{width}}  {v}")
        print()
        print(bold("━━━ access log") + dim(f"  ({stack.access_log_path})"))
        for e in stack.access_entries(None, min_count=len(SCENARIOS), timeout=3):
            dec = e.get("consentry_decision_json")
            items = dec if isinstance(dec, list) else ([dec] if dec else [])
            outcomes = ",".join(f"{d.get('direction')}:{d.get('outcome')}" for d in items) or "-"
            print(f"    {e.get('response_code')}  {e.get('method'):<4} "
                  f"{e.get('authority')}{e.get('path')}  consentry={outcomes}")
        print()
        print("done (Envoy and the services stop now); logs kept in", stack.run_dir)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping", file=sys.stderr)
        return 130
    except ce.EnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
