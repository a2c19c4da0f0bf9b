"""Every file a document of the repository names exists in a clone.

Checks the Markdown links (`[text](path)`) and the repository paths written in backticks
(`plugin/src/filter.rs`, `envoy/bench/run`) of every tracked Markdown file, so that a
document cannot point at a file outside the repository or one that was moved.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP = ("plugin/", "harness/", "envoy/", "tests/", "policies/", "scripts/", "docs/", "fuzz/", ".ci/")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TICKED = re.compile(r"`([^`\s]+)`")
# Written like paths, but criterion benchmark ids (plugin/benches/RESULTS.md).
NOT_PATHS = {"harness/plugin_load", "harness/plugin_start"}


def documents():
    out = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / p for p in out.stdout.split()]


def named_paths(doc: Path):
    text = doc.read_text()
    for m in LINK.finditer(text):
        target = m.group(1).split("#")[0]
        if target and not re.match(r"[a-z]+:", target):
            yield (doc.parent / target), m.group(0)
    for m in TICKED.finditer(text):
        p = m.group(1).rstrip(".,:;)")
        # Repository paths only: not globs, placeholders or build outputs.
        if p.startswith(TOP) and p not in NOT_PATHS and not re.search(r"[*<>{}$]|^target/", p) and ".run/" not in p:
            yield ROOT / p.split(":")[0], m.group(0)


def test_there_are_documents():
    assert len(documents()) >= 5


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_file_exists(doc):
    missing = sorted({f"{shown} -> {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}"
                      for p, shown in named_paths(doc) if not p.exists()})
    assert not missing, f"{doc.relative_to(ROOT)} names files that are not in the repository:\n" + "\n".join(missing)
