"""The harness and the real Envoy agree: the same exchanges, replayed by `consentry replay`
(the filter's .wasm in the harness's emulated host) and sent through the session's Envoy
(the same .wasm, the same policy, the same hash and subject keys), must give the same
result per exchange.

The exchanges are tests/traffic/equivalence.replay.json (a native replay file, also a
sample with modest expectations of its own). Per exchange this test

1. scripts the outside world the way the file does: the upstream's response through the
   recorder's respond API, the consent store's behaviour through its control API (the
   file-level `consent_store.answer` is loaded into the e2e store once, so both stores
   hold the same data; `status: 500` is the e2e store's `error500` mode, and so on);
2. sends the request through Envoy: same method, path with query, `authority` as Host,
   headers (including the fixed `x-request-id`, so local reply bodies and decision logs
   carry the same request id on both sides) and body bytes, built by the rules of the
   native format (compact JSON for `body`, `content-type: application/json` added when
   `body` is given without one). The caller is the exchange's `principal` (a SPIFFE id
   of the example policy), as in a mesh: the request goes over Envoy's mTLS listener
   presenting the test CA's client certificate with that URI SAN (the harness gives the
   filter the same id as the peer certificate's URI SAN); an exchange without a
   `principal` goes over plain HTTP. No exchange names its caller by header;
3. compares with the harness's `replay --format json` output:

   a. whether the upstream received the request, and if so its body (as JSON when both
      are JSON, else bytes), `:method`, `:path` (with the query) and `:authority`, the
      headers the filter binds or consumes (x-customer-email, x-customer-id,
      x-consentry-consent: present or absent, and the value), and every other header on
      the two sides;
   b. the status the client got, its body (JSON-compared; a local reply's body holds
      the request id, equal because x-request-id is fixed) and its headers;
   c. the decision log per direction: the outcome, and the whole entry but its `time`
      (the subject pseudonyms agree because both sides run with the same subject key).

Headers left out of the comparison, and why:

* `content-length`, `transfer-encoding`, `connection`: framing. consentry removes
  `content-length` from messages whose body it may change; in Envoy the buffer filter
  after it (and the codecs) frame the body again, so the upstream and the client see a
  new exact length, while the harness reports the filter's own output without one.
* `x-forwarded-proto`, `x-envoy-*`, `date`, `server`: added by Envoy's connection
  manager, router and codecs, never by the filter (`x-forwarded-proto` is `https` on
  the mTLS listener).
* `x-consentry-hold`: consentry's marker for the Lua response hold in front of it (see
  envoy/bootstrap.template.yaml); in Envoy that Lua filter removes it before the client
  sees the response, the harness shows the filter's output with it.
* `:scheme` (harness) has no counterpart in what an HTTP/1.1 upstream records.

Subject ids in the file all start with `eq-` (used by no other test), so the filter's
consent cache in the shared Envoy holds no answer for them from other tests. The test
fails on any difference and prints them per exchange; a difference is a fidelity bug of
the harness (or of the e2e services), not something to tolerate here.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import consentry_env as ce

ROOT = ce.ROOT
REPLAY_FILE = ROOT / "tests" / "traffic" / "equivalence.replay.json"
POLICY_FILE = ROOT / "policies" / "acme-customers.json"
HARNESS_BIN = ROOT / "target" / "debug" / "consentry"

# Filter-relevant request headers: bound by the policy (x-customer-email, x-customer-id)
# or consumed by the filter (x-consentry-consent).
FILTER_HEADERS = ("x-customer-email", "x-customer-id", "x-consentry-consent")
# Left out of every header comparison (see the module docstring).
IGNORED_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive",
                   "x-forwarded-proto", "date", "server", "x-consentry-hold", ":scheme"}
IGNORED_PREFIXES = ("x-envoy-",)


# --------------------------------------------------------------------------------------
# The harness side
# --------------------------------------------------------------------------------------

def _cargo() -> str:
    for c in (os.environ.get("CARGO"), shutil.which("cargo"),
              str(Path.home() / ".cargo" / "bin" / "cargo")):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    pytest.fail("no cargo to build the harness (target/debug/consentry): install Rust via "
                "rustup, or set $CARGO", pytrace=False)


def _build_harness():
    """`cargo build -p consentry-harness`: quick when fresh, never a stale binary."""
    p = subprocess.run([_cargo(), "build", "-q", "-p", "consentry-harness"], cwd=str(ROOT),
                       capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    if p.returncode != 0 or not HARNESS_BIN.is_file():
        pytest.fail(f"building the harness failed (cargo build -p consentry-harness, exit "
                    f"{p.returncode}):\n{p.stderr.strip()[-4000:]}", pytrace=False)


def _replay(stack) -> dict:
    cmd = [str(HARNESS_BIN), "replay", "--format", "json",
           "--policy", str(POLICY_FILE.relative_to(ROOT)),
           "--wasm", str(ce.find_wasm()),
           # The stack's keys from the environment, never on the command line.
           "--env", "CONSENTRY_HASH_KEY", "--env", "CONSENTRY_SUBJECT_KEY",
           str(REPLAY_FILE.relative_to(ROOT))]
    env = {**os.environ, "CONSENTRY_HASH_KEY": stack.hash_key,
           "CONSENTRY_SUBJECT_KEY": stack.subject_key}
    p = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL, env=env)
    shown = " ".join(cmd)
    if p.returncode not in (0, 1):
        pytest.fail(f"`{shown}` failed (exit {p.returncode}):\n{p.stderr.strip()}",
                    pytrace=False)
    try:
        out = json.loads(p.stdout)
    except ValueError as e:
        pytest.fail(f"`{shown}` did not print JSON ({e}):\n{p.stdout[:2000]}", pytrace=False)
    return out


# --------------------------------------------------------------------------------------
# The wire form of the file's messages (the rules of the native format)
# --------------------------------------------------------------------------------------

def _compact(value) -> bytes:
    # serde_json (preserve_order) writes compact JSON in the file's key order.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _body(msg: dict) -> bytes | None:
    if "body" in msg:
        return _compact(msg["body"])
    if "body_text" in msg:
        return msg["body_text"].encode()
    if "body_base64" in msg:
        return base64.b64decode("".join(msg["body_base64"].split()))
    return None


def _headers(msg: dict) -> list[tuple[str, str]]:
    out = []
    for k, v in (msg.get("headers") or {}).items():
        for one in (v if isinstance(v, list) else [v]):
            if isinstance(one, bool):
                one = "true" if one else "false"
            out.append((k.lower(), str(one)))
    if "body" in msg and not any(k == "content-type" for k, _ in out):
        out.append(("content-type", "application/json"))
    return out


def _store_mode(behaviour: dict, file_answer: dict) -> str:
    """The e2e consent store mode that behaves as the file's consent_store."""
    if "answer" in behaviour:
        if behaviour["answer"] != file_answer:
            pytest.fail("an exchange's own consent_store.answer is not supported here: the "
                        "e2e store holds the file-level answer only", pytrace=False)
        return "ok"
    if behaviour.get("status") == 500:
        return "error500"
    if behaviour.get("garbage"):
        return "garbage"
    if behaviour.get("down"):
        return "down"
    if behaviour.get("timeout"):
        return "slow"  # 1000 ms, over the policy's timeout_ms
    pytest.fail(f"the e2e consent store cannot behave as {behaviour}", pytrace=False)


def _grants(answer: dict) -> dict:
    """{subject: {key: bool}} from the file's answer (a grant may be {granted: bool})."""
    return {s: {k: (g["granted"] if isinstance(g, dict) else g) for k, g in keys.items()}
            for s, keys in answer.items()}


# --------------------------------------------------------------------------------------
# Normalising what each side saw
# --------------------------------------------------------------------------------------

def _ignored(name: str) -> bool:
    return name in IGNORED_HEADERS or name.startswith(IGNORED_PREFIXES)


def _header_map(pairs) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in pairs:
        k = k.lower()
        if k == "host":
            k = ":authority"
        if not _ignored(k):
            out.setdefault(k, []).append(v)
    return out


def _parse_body(raw: bytes):
    """('json', value) when the body is JSON, else ('bytes', raw)."""
    if raw:
        try:
            return "json", json.loads(raw)
        except ValueError:
            pass
    return "bytes", raw


def json_diff(a, b, path="$") -> list[str]:
    """One line per differing path: `harness` first, `envoy` second."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in a:
            if k in b:
                out += json_diff(a[k], b[k], f"{path}.{k}")
            else:
                out.append(f"    {path}.{k}: harness {json.dumps(a[k])}, envoy: missing")
        out += [f"    {path}.{k}: harness: missing, envoy {json.dumps(b[k])}"
                for k in b if k not in a]
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = []
        for i in range(max(len(a), len(b))):
            if i >= len(a):
                out.append(f"    {path}[{i}]: harness: missing, envoy {json.dumps(b[i])}")
            elif i >= len(b):
                out.append(f"    {path}[{i}]: harness {json.dumps(a[i])}, envoy: missing")
            else:
                out += json_diff(a[i], b[i], f"{path}[{i}]")
        return out
    if a != b or type(a) is not type(b):
        return [f"    {path}: harness {json.dumps(a)}, envoy {json.dumps(b)}"]
    return []


MAX_DIFF_LINES = 12


def _lines(d: list[str]) -> str:
    """A diff's lines, at most MAX_DIFF_LINES of them."""
    more = len(d) - MAX_DIFF_LINES
    return "\n".join(d[:MAX_DIFF_LINES] + ([f"    ... and {more} more"] if more > 0 else []))


def _compare_bodies(what: str, h_raw: bytes, e_raw: bytes, diffs: list[str]):
    hk, hv = _parse_body(h_raw)
    ek, ev = _parse_body(e_raw)
    if hk == ek == "json":
        d = json_diff(hv, ev)
        if d:
            diffs.append(f"{what} body differs:\n" + _lines(d))
    elif h_raw != e_raw:
        diffs.append(f"{what} body differs:\n    harness {h_raw[:400]!r}\n"
                     f"    envoy   {e_raw[:400]!r}")


def _compare_headers(what: str, h: dict, e: dict, diffs: list[str]):
    for name in sorted(set(h) | set(e)):
        hv, ev = h.get(name), e.get(name)
        if hv != ev:
            show = lambda v: "absent" if v is None else (repr(v[0]) if len(v) == 1 else repr(v))  # noqa: E731
            diffs.append(f"{what} header {name}: harness {show(hv)}, envoy {show(ev)}")


def _without_time(d):
    return None if d is None else {k: v for k, v in d.items() if k != "time"}


# --------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------

def test_harness_and_envoy_agree_on_every_exchange(stack):
    started = time.monotonic()
    _build_harness()
    spec = json.loads(REPLAY_FILE.read_text())
    replayed = _replay(stack)
    results = replayed["exchanges"]
    assert len(results) == len(spec["exchanges"]), \
        f"the harness replayed {len(results)} exchanges, the file holds {len(spec['exchanges'])}"

    file_store = spec.get("consent_store") or {"answer": {}}
    file_answer = file_store.get("answer") or {}
    # The same consent data in the e2e store as in the harness's scripted store.
    stack.services.store.set_data(_grants(file_answer), merge=True)

    report: list[str] = []
    for i, (ex, h) in enumerate(zip(spec["exchanges"], results)):
        diffs: list[str] = []
        req, resp = ex["request"], ex.get("response")
        cluster = ex["cluster"]
        authority = req["authority"]
        assert ce.HOSTS.get(cluster) == authority, \
            f"exchanges[{i}]: cluster {cluster!r} is not where Envoy routes {authority!r}"
        rid = dict(_headers(req)).get("x-request-id")
        assert rid, f"exchanges[{i}] needs a fixed x-request-id header"
        assert ce.CALLER_HEADER not in dict(_headers(req)), \
            f"exchanges[{i}] names its caller by {ce.CALLER_HEADER}: give it a `principal`"
        # The caller as in a mesh: the client certificate with the exchange's principal.
        principal = ex.get("principal")
        port, tls = stack.listener_port, None
        if principal is not None:
            port, tls = stack.mtls_port, stack.client_tls(ce.client_for_principal(principal))

        # 1. script the outside world
        stack.clear()
        stack.services.store.control(_store_mode(ex.get("consent_store", file_store),
                                                 file_answer), 1000)
        if resp is not None:
            rh = [(k, v) for k, v in _headers(resp) if k != "content-length"]
            # For whatever path reaches the upstream: Envoy may forward another spelling
            # of the recorded one (its path normalisation), as the harness does.
            stack.services.upstreams[cluster].respond(
                "*", int(resp.get("status", 200)), dict(rh), _body(resp) or b"", times=1)
        log_mark = len(stack.envoy.log_text())

        # 2. the same request through Envoy
        method = req.get("method", "GET")
        try:
            r = ce.http_request(port, method, req["path"], host=authority,
                                headers=_headers(req), body=_body(req), tls=tls)
        except (OSError, ce.TruncatedResponse) as e:
            r = None
            diffs.append(f"client: Envoy gave no complete response: {e!r}")
        recorded = stack.recorded(cluster)

        # 3a. what the upstream received
        h_fwd = h["request"]["fate"] == "forwarded"
        if len(recorded) > 1:
            diffs.append(f"upstream: Envoy delivered {len(recorded)} requests, expected one")
        if h_fwd != bool(recorded):
            diffs.append(f"upstream received the request: harness {h_fwd} "
                         f"({h['request']['fate']}), envoy {bool(recorded)}")
        elif h_fwd:
            hd, er = h["request"]["delivered"], recorded[0]
            _compare_bodies("upstream", hd["body"].encode(), base64.b64decode(er["body_b64"]),
                            diffs)
            hh = _header_map(hd["headers"])
            eh = _header_map([(":method", er["method"]), (":path", er["path"])]
                             + [tuple(p) for p in er["headers"]])
            # The filter's headers first (named in the report), then all the others.
            for name in (":path",) + FILTER_HEADERS:
                _compare_headers("upstream", {name: hh.pop(name)} if name in hh else {},
                                 {name: eh.pop(name)} if name in eh else {}, diffs)
            _compare_headers("upstream", hh, eh, diffs)

        # 3b. what the client got
        hc = h["response"].get("delivered")
        if r is not None:
            if hc is None:
                diffs.append(f"client: the harness says the client got nothing "
                             f"(request {h['request']['fate']}, response "
                             f"{h['response']['fate']}); Envoy answered {r.status} "
                             f"{r.body[:200]!r}"
                             + ("" if resp is not None else
                                " (give the exchange a `response`)"))
            else:
                hs = dict(hc["headers"]).get(":status")
                if str(r.status) != hs:
                    diffs.append(f"client status: harness {hs}, envoy {r.status}")
                _compare_bodies("client", hc["body"].encode(), r.body, diffs)
                _compare_headers("client",
                                 _header_map(p for p in hc["headers"] if p[0] != ":status"),
                                 _header_map(r.headers), diffs)

        # 3c. the decisions, per direction
        want = sum(1 for d in ("request", "response") if h[d].get("decision"))
        envoy_dec = _envoy_decisions(stack, rid, log_mark, want)
        for direction in ("request", "response"):
            hdec = h[direction].get("decision")
            if hdec:
                # The harness's records match the v2 schema too (Envoy's are checked
                # after every test, conftest.py).
                for problem in ce.decision_problems(hdec):
                    diffs.append(f"{direction} decision from the harness: {problem}")
            found = [d for d in envoy_dec if d.get("direction") == direction]
            if len(found) > 1:
                diffs.append(f"{direction} decision: Envoy logged {len(found)} entries")
            edec = found[0] if found else None
            ho = hdec.get("outcome") if hdec else "not logged"
            eo = edec.get("outcome") if edec else "not logged"
            if ho != eo:
                diffs.append(f"{direction} outcome: harness {ho}, envoy {eo}")
            elif hdec and edec:
                d = json_diff(_without_time(hdec), _without_time(edec))
                if d:
                    diffs.append(f"{direction} decision log differs:\n" + _lines(d))

        for m in h.get("mismatches") or []:
            diffs.append(f"the harness's own check against the file's expectations: {m}")
        if diffs:
            report.append(f"exchanges[{i}] {ex.get('name', '')} (x-request-id {rid}):\n  "
                          + "\n  ".join(x.replace("\n", "\n  ") for x in diffs))

    stack.clear()
    elapsed = time.monotonic() - started
    if report:
        pytest.fail(f"the harness and Envoy differ on {len(report)} of "
                    f"{len(spec['exchanges'])} exchange(s) of "
                    f"{REPLAY_FILE.relative_to(ROOT)} ({elapsed:.1f} s):\n\n"
                    + "\n\n".join(report), pytrace=False)


def _envoy_decisions(stack, rid: str, log_mark: int, want: int) -> list[dict]:
    """This exchange's decision log entries from Envoy's log (written after log_mark).

    Waits for `want` of them (what the harness logged); when the harness logged none,
    waits for the exchange's access log line first, so a late entry is still seen."""
    def current():
        return [d for d in ce.parse_decision_lines(stack.envoy.log_text()[log_mark:])
                if d.get("request_id") == rid]
    if want == 0:
        stack.access_entries(rid, min_count=1, timeout=3.0)
        time.sleep(0.2)
        return current()
    deadline = time.monotonic() + 5.0
    found = current()
    while len(found) < want and time.monotonic() < deadline:
        time.sleep(0.05)
        found = current()
    return found
