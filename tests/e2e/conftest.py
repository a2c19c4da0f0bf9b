"""pytest fixtures for the end-to-end tests: real Envoy, real consentry .wasm, real HTTP
on 127.0.0.1.

Nothing here skips. A missing Envoy or .wasm is an error with a message saying how to
get it (scripts/test builds and installs both), because a suite that skips silently
looks green while testing nothing.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import consentry_env as ce  # noqa: E402

_STACKS: list = []


def _sigterm(signum, frame):
    # `timeout` in scripts/test sends SIGTERM: unwind so fixtures stop Envoy by its pid.
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _sigterm)


def start_stack(**kwargs) -> ce.Stack:
    stack = ce.Stack(**kwargs)
    _STACKS.append(stack)
    try:
        stack.start()
    except ce.EnvError as e:
        pytest.fail(str(e), pytrace=False)
    return stack


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> ce.TestPKI:
    """The test CA, Envoy's server certificate and the client certificates (SPIFFE ids in
    ce.TEST_CLIENTS), made once per session with the openssl command line."""
    try:
        return ce.TestPKI.generate(tmp_path_factory.mktemp("tls"))
    except ce.EnvError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def make_stack(pki):
    """Start another stack (e.g. with a different policy); the caller stops it."""
    def make(**kwargs) -> ce.Stack:
        kwargs.setdefault("pki", pki)
        return start_stack(**kwargs)
    return make


@pytest.fixture(scope="session")
def stack(pki):
    """Services + Envoy with consentry and policies/acme-customers.json, for the session.
    Plain HTTP on stack.listener_port, mTLS (client certificates from `pki`) on
    stack.mtls_port."""
    s = start_stack(pki=pki)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(autouse=True)
def _clean_services(request):
    """Each test starts with empty recorders, a healthy consent store, fresh counts."""
    if "stack" in request.fixturenames:
        request.getfixturevalue("stack").clear()
    yield


@pytest.fixture(autouse=True)
def _decision_records_match_the_schema():
    """After each test, every decision record any stack wrote (Envoy's log and the access
    log) matches policies/consentry-decision-record.v2.schema.json (ce.decision_problems)."""
    yield
    problems = []
    for s in _STACKS:
        if s.run_dir is None:
            continue
        s.validate_decisions()
        problems.extend(s.decision_problems)
        s.decision_problems.clear()
    if problems:
        pytest.fail("decision records that do not match the v2 schema:\n" +
                    "\n".join(problems[:20]), pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    """Says how many decision records the suite checked against the schema."""
    n = sum(s.decisions_validated for s in _STACKS)
    if n:
        print(f"\n{n} decision records validated against the v2 schema")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the tail of Envoy's log (running stacks; else the last one)."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed or not _STACKS:
        return
    stacks = [s for s in _STACKS if s.envoy is not None and s.envoy.running()] or _STACKS[-1:]
    for s in stacks:
        if s.run_dir is None:
            continue
        try:
            lines = s.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            continue
        rep.sections.append((f"envoy log, last 60 lines ({s.log_path})",
                             "\n".join(line[:2000] for line in lines[-60:])))
