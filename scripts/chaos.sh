#!/usr/bin/env bash
# Chaos under load: kills every role of a running `zygote start` many times while a load of its
# own runs, and reports what the clients saw (scripts/chaos/chaos.py does the work; its
# docstring says what is measured and how).
#
#   scripts/chaos.sh [--scale K] [--spawns S] [--workers N] [--clients C]
#
# Loopback only (127.0.0.1, a free port), a temporary runtime directory, the example app on
# all-MiniLM-L6-v2 with the host backend. Bounded: each fault runs a fixed number of times
# (worker kills 10, owner 5, zygote 5, rolls 5, supervisor kills 3, stops 5, all times K),
# every wait has a deadline, and the whole run is cut at CHAOS_TIMEOUT seconds (default 1800);
# the service is stopped, then killed, on the way out. Takes about 2 minutes on 2 cores with
# the default 10,000 spawns (most of it the spacing of the zygote kills, see chaos.py).
#
# Uses ZYGOTE_BIN if set, else builds and uses the release binary (target/release/zygote). The
# run is niced: it is meant to share a machine. Writes the service logs and a JSON of every
# figure to a temporary directory it names at the end (CHAOS_OUT to choose it).
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

out="${CHAOS_OUT:-$(mktemp -d -t zygote-chaos.XXXXXX)}"
mkdir -p "$out/logs"
runtime_dir="$(mktemp -d -t zygote-chaos-rt.XXXXXX)"
chmod 700 "$runtime_dir"
trap 'rm -rf "$runtime_dir"' EXIT
# A free loopback port: bind to 0 and read what the kernel chose.
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

echo "== chaos: $bin, port $port, output in $out"
status=0
timeout --kill-after=30 "${CHAOS_TIMEOUT:-1800}" nice -n 19 python3 scripts/chaos/chaos.py \
    --zygote "$bin" --model "$model" --runtime-dir "$runtime_dir" --log-dir "$out/logs" \
    --port "$port" --json "$out/chaos.json" "$@" || status=$?
echo "== logs and figures: $out"
exit "$status"
