#!/usr/bin/env bash
# Sleep and wake of the example app: total PSS of the service awake and asleep, and
# wake -> first answer (a request sent while asleep: it wakes the service, waits in the
# listener's queue, and is answered by a new worker). Prints figures; asserts nothing.
#
#   scripts/bench-sleep.sh [--workers N] [--rounds R]
#
# Environment: ZYGOTE_BIN (default target/release/zygote, else target/debug/zygote),
# ZYGOTE_MODEL (default models/all-MiniLM-L6-v2), PORT (default 18411).
set -euo pipefail
cd "$(dirname "$0")/.."

workers=2
rounds=5
while [ $# -gt 0 ]; do
    case "$1" in
    --workers) workers="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
bin="${ZYGOTE_BIN:-target/release/zygote}"
[ -x "$bin" ] || bin=target/debug/zygote
model="${ZYGOTE_MODEL:-models/all-MiniLM-L6-v2}"
port="${PORT:-18411}"
rt="$(mktemp -d)"
log="$rt/service.log"
trap 'kill "$svc" 2>/dev/null || true; wait "$svc" 2>/dev/null || true; rm -rf "$rt"' EXIT

status() { "$bin" status --json --runtime-dir "$rt/rt" 2>/dev/null; }
pss_mib() { status | jq '[.processes[].pss_kib // 0] | add / 1024 | . * 10 | round / 10'; }
state() { status | jq -r '.processes[] | select(.role == "supervisor") | .state'; }
serving() {
    status | jq -e --argjson n "$workers" \
        '[.processes[] | select(.role == "worker" and .state == "serving")] | length == $n' \
        >/dev/null
}
wait_for() { # what, command...
    local what="$1" i
    shift
    for i in $(seq 600); do
        if "$@"; then return 0; fi
        sleep 0.05
    done
    echo "timed out waiting for $what" >&2
    tail -20 "$log" >&2
    exit 1
}
asleep() { [ "$(state)" = asleep ] && ! status | jq -e '.processes[] | select(.role == "owner")' >/dev/null; }
now_ms() { date +%s%3N; }
embed() {
    curl -sf -o /dev/null -X POST "http://127.0.0.1:$port/embed" \
        -H 'Content-Type: application/json' -d '{"input": ["a sleeping service wakes up"]}'
}

"$bin" start --model "$model" --workers "$workers" --entry app --backend host \
    --listen "127.0.0.1:$port" --runtime-dir "$rt/rt" >"$log" 2>&1 &
svc=$!
wait_for "the service to serve" serving
embed
echo "zygote: $bin, model $model, $workers app workers, $(nproc) cores, $(date -u +%FT%TZ)"
echo "total PSS awake (after one request): $(pss_mib) MiB"
for i in 1 2 3; do
    t0=$(now_ms)
    embed
    echo "awake: one request answered in $(($(now_ms) - t0)) ms"
done
for r in $(seq "$rounds"); do
    "$bin" sleep --runtime-dir "$rt/rt" >/dev/null
    wait_for "the service to sleep" asleep
    [ "$r" = 1 ] && echo "total PSS asleep: $(pss_mib) MiB"
    t0=$(now_ms)
    embed
    t1=$(now_ms)
    wait_for "every worker to serve" serving
    ready=$(grep -o 'awake: every worker serves [0-9]* ms' "$log" | tail -1 | grep -o '[0-9]* ms')
    echo "round $r: request while asleep -> answered in $((t1 - t0)) ms (wake -> every worker serving: $ready)"
done
echo "total PSS awake again: $(pss_mib) MiB"
"$bin" stop --runtime-dir "$rt/rt" >/dev/null
