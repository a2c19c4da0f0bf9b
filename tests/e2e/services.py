#!/usr/bin/env python3
"""Demo services for consentry's end-to-end tests and demo. Python stdlib only.

Two kinds of server, all on 127.0.0.1, HTTP/1.1 with exact content-lengths:

* A **recording upstream** per service (profile, marketing, analytics, billing, support,
  enrichment, unknown). It records every request it gets (method, path with query,
  headers, body) so a test can see exactly what the recipient received.

  - ``GET /v1/customers[?...]`` answers 200 application/json with
    ``fixtures/customers.json``.
  - anything else answers 200 ``{"ok":true}``.
  - ``GET /_recorded`` returns the recorded requests as JSON (body as text and base64),
    ``DELETE /_recorded`` clears them.
  - ``POST /_respond`` with ``{"path": "/v1/customers", "status": 200, "headers":
    {...}, "body": "text" | "body_b64": "...", "times": 1}`` sets the next response(s)
    for that path (``times`` defaults to 1; 0 means until cleared);
    ``DELETE /_respond`` clears all of them.

  Control endpoints (``/_...``) are not recorded.

* A **consent store**: ``POST /v1/consents:lookup`` with ``{"subjects": [...]}``
  answers ``{"consents": {subject: {key: bool}}}``; subjects it does not know are
  omitted. ``POST /_control`` with ``{"mode": "ok"|"down"|"slow"|"error500"|"garbage",
  "delay_ms": N}`` changes its behaviour ("down" closes the connection without an
  answer); ``GET /_stats`` tells how many lookups it served and which subjects were
  asked; ``DELETE /_stats`` resets that; ``POST /_data`` replaces its data
  (``{"consents": {...}}``), ``PATCH /_data`` merges into it.

Run standalone::

    python3 tests/e2e/services.py --config ports.json

where ports.json maps each service name (and ``consent_store``) to a port; a missing
file, a missing name or port 0 picks a free port. The ports in use are printed as one
JSON line on stdout (and written back to the file with ``--write-config``).
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"

# Every upstream the bootstrap routes to. "unknown" is a service the policy does not
# declare: it must receive no customer data.
UPSTREAMS = ("profile", "marketing", "analytics", "billing", "support", "enrichment", "unknown")
CONSENT_STORE = "consent_store"
ALL_SERVICES = UPSTREAMS + (CONSENT_STORE,)

SOCKET_TIMEOUT_S = 30.0
MAX_BODY = 64 * 1024 * 1024


def load_fixture(name: str):
    with open(FIXTURES / name, "rb") as f:
        return json.load(f)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Envoy opens several pooled connections; keep a deep accept queue.
    request_queue_size = 128

    def __init__(self, addr, handler, app):
        self.app = app
        super().__init__(addr, handler)

    def handle_error(self, request, client_address):  # noqa: D401 - quiet on resets
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout, TimeoutError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "consentry-e2e/1"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_S

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        if os.environ.get("CONSENTRY_SERVICES_VERBOSE"):
            sys.stderr.write("%s %s\n" % (self.server.app.name, format % args))

    # Every method goes through one dispatcher.
    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            total = 0
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("eof in chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until an empty line
                    while True:
                        t = self.rfile.readline(65537)
                        if t in (b"\r\n", b"\n", b""):
                            break
                    break
                total += size
                if total > MAX_BODY:
                    raise ConnectionError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ConnectionError("body too large")
        return self.rfile.read(length) if length else b""

    def _dispatch(self):
        try:
            body = self._read_body()
        except (ConnectionError, ValueError):
            self.close_connection = True
            return
        self.server.app.handle(self, body)

    def send_bytes(self, status: int, body: bytes, headers: dict | list | None = None,
                   content_type: str | None = "application/json"):
        self.send_response(status)
        have = set()
        items = headers.items() if isinstance(headers, dict) else (headers or [])
        for k, v in items:
            if k.lower() in ("content-length", "transfer-encoding", "connection"):
                continue
            have.add(k.lower())
            self.send_header(k, v)
        if content_type and "content-type" not in have:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def send_json(self, status: int, obj, headers=None):
        self.send_bytes(status, json.dumps(obj).encode(), headers)


def _request_target(h: _Handler) -> str:
    """The request-target of the request line, byte for byte (h.path may be altered)."""
    parts = (h.requestline or "").split(" ")
    return parts[1] if len(parts) == 3 else h.path


class _App:
    name = "app"

    def __init__(self, port: int = 0):
        self._server = _Server(("127.0.0.1", port), _Handler, self)
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=f"svc-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        try:
            self._server.shutdown()
        finally:
            self._server.server_close()
            if self._thread:
                self._thread.join(timeout=5)

    def handle(self, h: _Handler, body: bytes):
        raise NotImplementedError


class RecordingUpstream(_App):
    """One service: records what it receives, answers fixtures or scripted responses."""

    def __init__(self, name: str, port: int = 0):
        self.name = name
        self._lock = threading.Lock()
        self._recorded: list[dict] = []
        self._scripted: dict[str, list] = {}
        self._customers = json.dumps(load_fixture("customers.json"), indent=2).encode()
        super().__init__(port)

    # -- in-process API (the same data the control endpoints give) ---------------
    def recorded(self) -> list[dict]:
        with self._lock:
            return copy.deepcopy(self._recorded)

    def clear(self):
        with self._lock:
            self._recorded.clear()
            self._scripted.clear()

    def respond(self, path: str, status: int = 200, headers: dict | None = None,
                body: bytes | str = b"", times: int = 1):
        """Set the next response(s) for `path` (without query; `*`: any path without a
        response of its own). times=0: until cleared."""
        if isinstance(body, str):
            body = body.encode()
        with self._lock:
            self._scripted.setdefault(path, []).append(
                {"status": status, "headers": dict(headers or {}), "body": body, "times": times})

    def _next_scripted(self, path: str):
        with self._lock:
            queue = self._scripted.get(path) or self._scripted.get("*")
            if not queue:
                return None
            entry = queue[0]
            if entry["times"] > 0:
                entry["times"] -= 1
                if entry["times"] == 0:
                    queue.pop(0)
            return entry

    # -- HTTP --------------------------------------------------------------------
    def handle(self, h: _Handler, body: bytes):
        split = urlsplit(h.path)
        path = split.path
        if path == "/_recorded":
            if h.command == "DELETE":
                self.clear()
                return h.send_json(200, {"ok": True})
            return h.send_json(200, self.recorded())
        if path == "/_respond":
            if h.command == "DELETE":
                with self._lock:
                    self._scripted.clear()
                return h.send_json(200, {"ok": True})
            try:
                spec = json.loads(body or b"{}")
                raw = (base64.b64decode(spec["body_b64"]) if "body_b64" in spec
                       else spec.get("body", "").encode())
                self.respond(spec["path"], int(spec.get("status", 200)), spec.get("headers"),
                             raw, int(spec.get("times", 1)))
            except (ValueError, KeyError, TypeError) as e:
                return h.send_json(400, {"error": f"bad /_respond spec: {e}"})
            return h.send_json(200, {"ok": True})

        entry = {
            "time": time.time(),
            "method": h.command,
            # The request target as it came on the request line: http.server collapses a
            # leading `//` in h.path (gh-87389), and the tests must see what Envoy sent.
            "path": _request_target(h),
            "headers": [[k, v] for k, v in h.headers.items()],
            "body": body.decode("utf-8", "replace"),
            "body_b64": base64.b64encode(body).decode(),
        }
        with self._lock:
            self._recorded.append(entry)

        scripted = self._next_scripted(path)
        if scripted is not None:
            return h.send_bytes(scripted["status"], scripted["body"], scripted["headers"],
                                content_type=None)
        if h.command == "GET" and path == "/v1/customers":
            return h.send_bytes(200, self._customers)
        return h.send_json(200, {"ok": True})


class ConsentStore(_App):
    """The consent store the filter calls through the `consent_store` cluster."""

    name = CONSENT_STORE
    MODES = ("ok", "down", "slow", "error500", "garbage")

    def __init__(self, port: int = 0, data: dict | None = None):
        self._lock = threading.Lock()
        self._data: dict = copy.deepcopy(
            data if data is not None else load_fixture("consent_store.json")["consents"])
        self._mode = "ok"
        self._delay_ms = 1000
        self._lookups: list[dict] = []
        super().__init__(port)

    # -- in-process API ----------------------------------------------------------
    def control(self, mode: str = "ok", delay_ms: int | None = None):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, not {mode!r}")
        with self._lock:
            self._mode = mode
            if delay_ms is not None:
                self._delay_ms = int(delay_ms)

    def stats(self) -> dict:
        with self._lock:
            return {
                "mode": self._mode,
                "lookups": len(self._lookups),
                "subjects": sorted({s for lk in self._lookups for s in lk["subjects"]}),
                "requests": copy.deepcopy(self._lookups),
            }

    def reset_stats(self):
        with self._lock:
            self._lookups.clear()

    def set_data(self, consents: dict, merge: bool = False):
        with self._lock:
            if not merge:
                self._data = {}
            self._data.update(copy.deepcopy(consents))

    # -- HTTP --------------------------------------------------------------------
    def handle(self, h: _Handler, body: bytes):
        path = urlsplit(h.path).path
        if path == "/_control":
            try:
                spec = json.loads(body or b"{}")
                self.control(spec.get("mode", "ok"), spec.get("delay_ms"))
            except (ValueError, TypeError) as e:
                return h.send_json(400, {"error": str(e)})
            return h.send_json(200, {"ok": True, "mode": self._mode})
        if path == "/_stats":
            if h.command == "DELETE":
                self.reset_stats()
                return h.send_json(200, {"ok": True})
            return h.send_json(200, self.stats())
        if path == "/_data":
            try:
                self.set_data(json.loads(body or b"{}").get("consents", {}),
                              merge=h.command == "PATCH")
            except (ValueError, AttributeError) as e:
                return h.send_json(400, {"error": str(e)})
            return h.send_json(200, {"ok": True})

        if not (h.command == "POST" and path == "/v1/consents:lookup"):
            return h.send_json(404, {"error": "not found"})

        try:
            req = json.loads(body or b"{}")
            subjects = [str(s) for s in req.get("subjects", [])]
        except (ValueError, AttributeError, TypeError):
            subjects, req = [], None
        with self._lock:
            mode, delay_ms = self._mode, self._delay_ms
            self._lookups.append({
                "time": time.time(),
                "subjects": subjects,
                "authority": h.headers.get("Host"),
                "mode": mode,
            })
            answer = {s: copy.deepcopy(self._data[s]) for s in subjects if s in self._data}

        if mode == "down":
            # Emulate a dead store: drop the connection without a byte of answer.
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return None
        if mode == "slow":
            time.sleep(delay_ms / 1000.0)
        if mode == "error500":
            return h.send_json(500, {"error": "consent store exploded"})
        if mode == "garbage":
            return h.send_bytes(200, b"<html>this is not JSON{", content_type="application/json")
        if req is None:
            return h.send_json(400, {"error": "body must be JSON {\"subjects\": [...]}"})
        try:
            return h.send_json(200, {"consents": answer})
        except (BrokenPipeError, ConnectionError):
            return None


class Services:
    """All demo services, started in threads of this process."""

    def __init__(self, ports: dict | None = None, store_data: dict | None = None):
        ports = dict(ports or {})
        self.upstreams: dict[str, RecordingUpstream] = {}
        started: list[_App] = []
        try:
            for name in UPSTREAMS:
                up = RecordingUpstream(name, int(ports.get(name) or 0)).start()
                started.append(up)
                self.upstreams[name] = up
            self.store = ConsentStore(int(ports.get(CONSENT_STORE) or 0), store_data).start()
            started.append(self.store)
        except BaseException:
            for s in started:
                s.stop()
            raise
        self._all = started

    @property
    def ports(self) -> dict:
        p = {name: up.port for name, up in self.upstreams.items()}
        p[CONSENT_STORE] = self.store.port
        return p

    def clear(self):
        """Forget everything recorded and scripted; consent store back to normal."""
        for up in self.upstreams.values():
            up.clear()
        self.store.control("ok", 1000)
        self.store.reset_stats()

    def stop(self):
        for s in self._all:
            try:
                s.stop()
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="JSON file: service name -> port (0 = pick one)")
    ap.add_argument("--write-config", action="store_true",
                    help="write the ports actually used back to --config")
    args = ap.parse_args(argv)

    ports = {}
    if args.config and os.path.exists(args.config):
        with open(args.config) as f:
            ports = json.load(f)
    # Handlers first: whoever reads the ports line may signal us right after.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    services = Services(ports)
    try:
        if args.config and args.write_config:
            with open(args.config, "w") as f:
                json.dump(services.ports, f, indent=2)
        print(json.dumps(services.ports), flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        services.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
