#!/usr/bin/env bash
# kill -9 of a worker -> first answer of its replacement, without and with warm spares, under
# load, in one run, the two services side by side with their kills alternating
# (scripts/bench-spares/spares.py does the work; its docstring says what is
# measured and how).
#
#   scripts/bench-spares.sh [--workers N] [--spares K] [--kills R] [--clients C] [--backend B]
#
# Loopback only (127.0.0.1, free ports), temporary runtime directories, the example app on
# all-MiniLM-L6-v2 with the host backend (--backend cuda on a GPU), `--spares 0` beside
# `--spares K` (default 1). Bounded: R kills each (default 10), every wait has a deadline, the whole run is cut at
# BENCH_TIMEOUT seconds (default 600).
#
# Uses ZYGOTE_BIN if set, else builds and uses the release binary (target/release/zygote).
# Writes the service logs and a JSON of every figure to a temporary directory it names at
# the end (BENCH_OUT to choose it).
set -euo pipefail
cd "$(dirname "$0")/.."

model=models/all-MiniLM-L6-v2
scripts/fetch-model.sh "$model" >/dev/null

if [[ -n "${ZYGOTE_BIN:-}" ]]; then
    bin="$ZYGOTE_BIN"
else
    echo "== cargo build --release --bin zygote"
    nice -n 19 cargo build --release --bin zygote -j"${CARGO_BUILD_JOBS:-1}"
    bin=target/release/zygote
fi

out="${BENCH_OUT:-$(mktemp -d -t zygote-bench-spares.XXXXXX)}"
mkdir -p "$out/logs"
echo "== bench-spares: $bin, output in $out ($(date -u '+%Y-%m-%d %H:%M UTC'))"
status=0
timeout --kill-after=30 "${BENCH_TIMEOUT:-600}" python3 scripts/bench-spares/spares.py \
    --zygote "$bin" --model "$model" --log-dir "$out/logs" --json "$out/spares.json" "$@" \
    || status=$?
echo "== logs and figures: $out"
exit "$status"
