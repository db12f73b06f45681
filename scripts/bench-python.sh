#!/usr/bin/env bash
# Python apps benchmark: the ported seed 002 app served by `zygote start --app` against the
# seed's own gunicorn service (scripts/baseline/), same machine, same model, one run.
#
#   scripts/bench-python.sh [--workers N] [--duration S] [--trials K] [--out DIR]
#                           [--baselines "seed preload"] [--torch-threads T]
#                           [--zygote-threads N] [--zygote-spares "0 1"]
#
# For each service, in turn, alone on the machine: start it and time start -> every worker
# answering (embedctl.py wait-ready); warm up 5 s; total PSS of its process tree
# (scripts/pss.py: gunicorn master + workers; zygote supervisor, zygote, owner, workers);
# throughput and latency under wrk (2 x N keep-alive connections, one sentence per POST
# /embed, scripts/bench-embed/sentences.txt) for --duration seconds; kill -9 of a worker ->
# first answer of its replacement, --trials times (embedctl.py restart); a reload under wrk
# load (SIGHUP to gunicorn's master, `zygote reload`): the time until every worker is
# replaced, and the failed requests meanwhile (wrk's socket errors and non-2xx answers); stop
# it. For zygote also spawn -> ready of its workers (p50 of the supervisor's `ready in` lines:
# the start's and the replacements'). Prints a markdown table (also OUT/table.md). Targets:
# issue 12, zygote's total PSS at most half of gunicorn's without --preload; issue 13,
# spawn -> ready <= 100 ms p50, kill -> first answer <= 150 ms median, PSS <= 0.8 x gunicorn
# --preload's. gunicorn's HUP under --preload restarts the workers but reloads no code.
#
# Services: "seed" = gunicorn as seed 002 runs it (no --preload), "preload" = gunicorn
# --preload (CPU only: with CUDA it is what fails in the seeds), "zygote" = the port in
# examples/python/seed002 with the host backend. --torch-threads T (default 1) sets torch's
# intra-op threads in every worker of every service (OMP_NUM_THREADS, MKL_NUM_THREADS;
# 0: torch's default, one per core, which oversubscribes a small machine with several
# workers). --zygote-threads N (default 1) is each zygote worker's request threads (`zygote
# start --threads`): one, like the sync gunicorn worker of the baselines, which serves one
# request at a time; more threads in one worker contend for the GIL between torch's ops. No
# timed assertion: it prints figures. --zygote-spares LIST (default "0 1") runs the zygote service
# once per value K, with `--spares K` (warm spares: a kill's replacement is a spare already
# forked and bound, activated; the total PSS then counts the K spares too); each kill then
# waits for a ready spare first (the pool refills a second after an activation).
#
# Needs: scripts/baseline/setup.sh (baseline venv, wrk), scripts/python-setup.sh (the zygote
# package's venv), target/release/zygote (or ZYGOTE_BIN). Every process it starts runs in
# its own session and is stopped on exit; every wait has a deadline.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
workers=4
duration=20
trials=3
baselines="seed preload"
torch_threads=1
zygote_threads=1
zygote_spares="0 1"
out="$repo/bench-out/python-$(date -u +%Y%m%d-%H%M%S)"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --workers) workers="$2"; shift 2 ;;
        --duration) duration="$2"; shift 2 ;;
        --trials) trials="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --baselines) baselines="$2"; shift 2 ;;
        --torch-threads) torch_threads="$2"; shift 2 ;;
        --zygote-threads) zygote_threads="$2"; shift 2 ;;
        --zygote-spares) zygote_spares="$2"; shift 2 ;;
        -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
        *) echo "bench-python.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

zbin="${ZYGOTE_BIN:-$repo/target/release/zygote}"
pyvenv="${PYTHON_VENV:-$repo/.venv-python}"
basevenv="${BASELINE_VENV:-$repo/.venv-baseline}"
ctl="$here/bench-embed/embedctl.py"
port="${BASE_PORT:-18600}"
for need in "$zbin" "$pyvenv/bin/python" "$basevenv/bin/gunicorn"; do
    [[ -e "$need" ]] || { echo "bench-python.sh: $need is missing (see --help)" >&2; exit 1; }
done
command -v wrk >/dev/null || { echo "bench-python.sh: wrk is missing" >&2; exit 1; }
model="$("$basevenv/bin/python" "$here/baseline/model_dir.py")"
mkdir -p "$out"
if [[ "$torch_threads" != 0 ]]; then
    export TORCH_THREADS="$torch_threads" OMP_NUM_THREADS="$torch_threads" \
        MKL_NUM_THREADS="$torch_threads"
fi
"$basevenv/bin/python" "$ctl" bodies "$here/bench-embed/sentences.txt" "$out/bodies.txt" >/dev/null

pgids=()
cleanup() {
    for g in "${pgids[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
    sleep 1
    for g in "${pgids[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
}
trap cleanup EXIT

# A reload under load: RELOAD (a command) and PIDS (prints the serving workers' pids) in the
# environment. Prints {"reload_s": S, "failed": N}.
reload_run() {  # NAME URL
    local name="$1" url="$2" before now t0 t1 wpid
    before="$(eval "$PIDS" | sort)"
    wrk -t 2 -c "$((2 * workers))" -d 30 -s "$here/bench-embed/embed.lua" "$url" -- \
        "$out/bodies.txt" >"$out/$name.reload.wrk" 2>&1 &
    wpid=$!
    sleep 3
    t0="$(date +%s.%N)"
    eval "$RELOAD"
    t1=""
    for _ in $(seq 1 1200); do
        now="$(eval "$PIDS" | sort)"
        if [[ "$(echo "$now" | grep -c .)" == "$workers" ]] \
            && [[ -z "$(comm -12 <(echo "$before") <(echo "$now"))" ]]; then
            t1="$(date +%s.%N)"
            break
        fi
        sleep 0.05
    done
    wait "$wpid" || true
    python3 - "$t0" "$t1" "$out/$name.reload.wrk" <<'PY'
import json, re, sys
t0, t1, wrk = sys.argv[1:]
text = open(wrk).read()
errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
failed = errors + (int(non2xx.group(1)) if non2xx else 0)
print(json.dumps({"reload_s": round(float(t1) - float(t0), 2) if t1 else None, "failed": failed}))
PY
}

rows=()
measure() {  # NAME URL PID SINCE [wait-ready args...]; RESTART_ARGS, RELOAD, PIDS, LOG in the environment
    local name="$1" url="$2" pid="$3" since="$4"
    shift 4
    local ready pss wrkout restart
    ready="$("$basevenv/bin/python" "$ctl" wait-ready --url "$url" --workers "$workers" \
        --since "$since" --timeout 600 "$@" || echo '{}')"
    echo "$name: $ready" >&2
    wrk -t 2 -c "$((2 * workers))" -d 5 -s "$here/bench-embed/embed.lua" "$url" -- \
        "$out/bodies.txt" >/dev/null 2>&1 || true
    pss="$(python3 "$here/pss.py" --json "$pid")"
    echo "$name: total PSS $(echo "$pss" | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"]["pss_kib"] // 1024)') MiB" >&2
    wrkout="$(wrk -t 2 -c "$((2 * workers))" -d "$duration" --latency \
        -s "$here/bench-embed/embed.lua" "$url" -- "$out/bodies.txt" 2>&1 | tee "$out/$name.wrk")"
    echo "$wrkout" | grep -E "Requests/sec" >&2 || true
    restart="$("$basevenv/bin/python" "$ctl" restart --url "$url" --trials "$trials" \
        --timeout 300 --pollers "$workers" $RESTART_ARGS || echo '{}')"
    echo "$name: restart $restart" >&2
    reload="$(reload_run "$name" "$url" || echo '{}')"
    echo "$name: reload $reload" >&2
    rows+=("$("$basevenv/bin/python" - "$name" "$ready" "$pss" "$out/$name.wrk" "$restart" \
        "$reload" "${LOG:-}" <<'PY'
import json, re, statistics, sys
name, ready, pss, wrk, restart, reload, log = sys.argv[1:]
ready, pss, restart = json.loads(ready), json.loads(pss), json.loads(restart)
reload = json.loads(reload)
spawn = "-"
if log:
    ms = [int(m) for m in re.findall(r"worker \d+ \(pid \d+\) ready in (\d+) ms", open(log).read())]
    if ms:
        spawn = f"{statistics.median(ms):.0f} ms (n={len(ms)})"
text = open(wrk).read()
rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
m = re.search(r"WRKJSON (\{.*\})", text)
lat = json.loads(m.group(1)) if m else {}
total = pss["total"]["pss_kib"] / 1024
print(f"| {name} | {ready.get('all_ready_s', '-')} s | {total:.0f} MiB | "
      f"{float(rps.group(1)) if rps else 0:.1f} | {lat.get('p50_us', 0) / 1000:.1f} ms | "
      f"{restart.get('median_ms', '-')} ms | {spawn} | {reload.get('reload_s', '-')} s | "
      f"{reload.get('failed', '-')} |")
PY
)")
}

for b in $baselines; do
    since="$(date +%s.%N)"
    extra=()
    [[ "$b" == "preload" ]] && extra=(--preload)
    setsid "$here/baseline/run.sh" "$workers" "$port" "${extra[@]}" >"$out/$b.log" 2>&1 &
    master=$!
    pgids+=("$master")
    RESTART_ARGS="--gunicorn-master $master" RELOAD="kill -HUP $master" \
        PIDS="pgrep -P $master" LOG="" measure "gunicorn $b" "http://127.0.0.1:$port" \
        "$master" "$since"
    kill -TERM -- "-$master" 2>/dev/null || true
    wait "$master" 2>/dev/null || true
    port=$((port + 1))
done

for k in $zygote_spares; do
    name="zygote --app"
    [[ "$k" != 0 ]] && name="zygote --app --spares $k"
    rdir="$out/zygote-rt-s$k"
    zlog="$out/zygote-s$k.log"
    since="$(date +%s.%N)"
    HF_HUB_OFFLINE=1 PATH="$pyvenv/bin:$PATH" setsid "$zbin" start --model "$model" \
        --app main:app --app-dir "$repo/examples/python/seed002" --workers "$workers" \
        --threads "$zygote_threads" --spares "$k" --backend host --listen "127.0.0.1:$port" \
        --runtime-dir "$rdir" >"$zlog" 2>&1 &
    sup=$!
    pgids+=("$sup")
    RESTART_ARGS="--zygote $zbin --runtime-dir $rdir --log $zlog" \
        RELOAD="$zbin reload --runtime-dir $rdir >/dev/null" LOG="$zlog" \
        PIDS="python3 $here/bench-embed/serving_workers.py $zbin $rdir" \
        measure "$name" "http://127.0.0.1:$port" "$sup" "$since" \
        --zygote "$zbin" --runtime-dir "$rdir"
    kill -TERM "$sup" 2>/dev/null || true
    wait "$sup" 2>/dev/null || true
    port=$((port + 1))
done

{
    echo "seed 002 app, $workers workers, $(getconf _NPROCESSORS_ONLN) cores, torch threads ${torch_threads/#0/default}," \
        "zygote request threads $zygote_threads, wrk ${duration}s x $((2 * workers)) connections"
    echo
    echo "| service | start -> all answering | total PSS | req/s | p50 | kill -9 -> first answer (median of $trials) | spawn -> ready p50 | reload: all replaced | failed requests during reload |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    printf '%s\n' "${rows[@]}"
} | tee "$out/table.md"
