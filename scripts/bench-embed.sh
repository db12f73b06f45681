#!/usr/bin/env bash
# Embeddings benchmark: the seed 002 Python service (gunicorn + Flask +
# sentence-transformers) and the ONNX Runtime one (gunicorn + Flask + ONNX
# Runtime) against zygote, same machine, same model (all-MiniLM-L6-v2), same
# request mix, one run; first the single-thread forward pass of each engine.
#
#   scripts/bench-embed.sh [options]
#     --workers "2 4"     worker counts to measure (default: 2 4)
#     --duration S        measured load per service and round (default: 10)
#     --rounds R          rounds of measured load (default: 3); in each, every
#                         service of the worker count is loaded in turn, the
#                         order rotated one place per round
#     --warmup S          unmeasured load once, after a service's start (default: 5)
#     --trials K          worker kills per configuration (default: 3)
#     --only python|zygote   measure one side only
#     --baselines "seed t1 t1-preload ort"
#                         the Python variants to measure (default: all four):
#                         seed        as seed 002 is written: no --preload, torch
#                                     with one thread per core in every worker
#                                     (oversubscribed with several workers on 2 cores)
#                         t1          the same with one torch thread per worker
#                                     (TORCH_THREADS=1): the tuned deployment
#                         t1-preload  t1 with gunicorn --preload: the model loaded
#                                     once in the master and shared copy-on-write
#                                     (works on CPU; on CUDA it is what fails in
#                                     seeds 000 and 002). seed-preload also exists.
#                         ort         gunicorn + Flask + ONNX Runtime
#                                     (scripts/baseline/app_onnx.py): the model
#                                     exported to ONNX (opset 17), one intra-op
#                                     thread per worker, --preload
#     --forward-seconds S the single-thread forward pass, before the services:
#                         S seconds per engine and round, --rounds rounds
#                         (default: 5; 0: skip it): ONNX Runtime, torch and
#                         zygote's encoder (its forward_bench example, AVX-512
#                         where the CPU has it, then AVX2), one text per call
#                         over scripts/bench-embed/sentences.txt, and each
#                         service's lowest cosine to sentence-transformers
#     --host-weights "f32 f16 bf16"
#                         the forms of zygote's host compute copy to measure
#                         (default: f32): zygote's forward pass runs once per
#                         form (forward_bench --host-weights F; bf16 on AMX
#                         where the CPU has it, and also without) and one
#                         zygote service per form (zygote start --host-weights
#                         F, "zygote-wN" for f32, "zygote-wN-F" for the others),
#                         in the same rounds as the others
#     --out DIR           where logs and results go (default: bench-out/embed-DATE)
#     --quiet-wait S      before each measured load, wait up to S s for the
#                         machine to be idle (default: 60; 0: don't)
#
# Environment: ZYGOTE_BIN (default target/release/zygote), FORWARD_BENCH
# (default target/release/examples/forward_bench), ZYGOTE_MODEL (model
# directory given to `zygote start --model`; default: the directory the
# baseline loads, so both serve the same files; empty: no --model flag),
# ZYGOTE_ARGS (extra arguments for `zygote start`), BASELINE_VENV, BASE_PORT.
#
# For each worker count, in two phases. First each service alone: started
# (the start-up time), warmed up, its PSS taken and workers killed (PSS splits
# a shared library's pages between every process that maps it, so another
# service up at the same time would lower it). Then every service is started
# again, one after the other, and all stay up while the rounds alternate the
# measured load between them, so a drift of the machine's speed (this shared
# machine's varies by several per cent within minutes) weighs on each alike.
# For each service and worker count: requests/s
# over all rounds, the median of the rounds' p50 latency and the highest of
# their p99, from wrk (keep-alive connections, 2 x workers of them, one
# sentence per POST /embed, cycling through scripts/bench-embed/sentences.txt),
# and the spread of the rounds' requests/s; total PSS of every
# process of the service (scripts/pss.py over the process tree: gunicorn
# master + workers; zygote supervisor, zygote, owner and workers), taken after
# the warm-up; the time from `kill -9` of one worker to the first answer of its
# replacement, while as many clients as the load has connections post on fresh
# connections (scripts/bench-embed/embedctl.py restart), and for zygote also to
# the supervisor's log line saying the replacement is ready; and the CPU used
# during the measured load by the service, by wrk and by anything else on the
# machine (a busy machine distorts the figures: the "other" column shows it).
# Prints a markdown table and writes it to OUT/table.md.
#
# Needs: scripts/baseline/setup.sh run once (venv + wrk + the ONNX export), and
# for zygote target/release/zygote and its forward_bench example. Every process this
# script starts runs in its own session and is stopped on exit (trap); every
# loop is bounded by a deadline.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
helpers="$repo/scripts/bench-embed"
ctl=(python3 "$helpers/embedctl.py")

workers_list="2 4"; duration=10; rounds=3; warmup=5; trials=3; only=""; quiet_wait=60
baselines="seed t1 t1-preload ort"; forward_seconds=5; host_weights="f32"
out="$repo/bench-out/embed-$(date +%Y%m%d-%H%M%S)"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --workers) workers_list="$2"; shift 2 ;;
        --duration) duration="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --warmup) warmup="$2"; shift 2 ;;
        --trials) trials="$2"; shift 2 ;;
        --only) only="$2"; shift 2 ;;
        --baselines) baselines="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --quiet-wait) quiet_wait="$2"; shift 2 ;;
        --forward-seconds) forward_seconds="$2"; shift 2 ;;
        --host-weights) host_weights="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-embed.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
case "$only" in ""|python|zygote) ;; *) echo "bench-embed.sh: --only python|zygote" >&2; exit 2 ;; esac
for f in $host_weights; do
    case "$f" in f32|f16|bf16) ;; *) echo "bench-embed.sh: --host-weights takes f32, f16 and/or bf16, not $f" >&2; exit 2 ;; esac
done
for v in "$duration:--duration" "$rounds:--rounds" "$trials:--trials"; do
    [[ "${v%%:*}" =~ ^[1-9][0-9]*$ ]] || { echo "bench-embed.sh: ${v#*:} takes a whole number above 0" >&2; exit 2; }
done

venv="${BASELINE_VENV:-$repo/.venv-baseline}"
zbin="${ZYGOTE_BIN:-$repo/target/release/zygote}"
fbench="${FORWARD_BENCH:-$repo/target/release/examples/forward_bench}"
base_port="${BASE_PORT:-18400}"
mkdir -p "$out"
results="$out/results.jsonl"
: > "$results"

say() { echo "bench-embed: $*" >&2; }

# ------------------------------------------------------------ cleanup
# pgids of the sessions we started (each service runs under setsid, so its
# pid is its process group id and its children share it).
started=()
zygote_dirs=()
helper_pids=()
# Run a helper (wrk, embedctl.py) in the background and wait for it: bash
# runs a signal trap only once the foreground command returns, while `wait`
# is cut short by one, so Ctrl-C or a TERM stops the run at once.
run() {
    "$@" &
    local p=$! rc=0
    helper_pids+=("$p")
    wait "$p" || rc=$?
    forget "$p"
    return "$rc"
}
# Drop a reaped helper's pid, so that cleanup never signals a reused pid.
forget() {
    local keep=() q
    for q in "${helper_pids[@]+"${helper_pids[@]}"}"; do
        if [[ "$q" != "$1" ]]; then keep+=("$q"); fi
    done
    helper_pids=("${keep[@]+"${keep[@]}"}")
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local d pg p
    for p in "${helper_pids[@]+"${helper_pids[@]}"}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for d in "${zygote_dirs[@]+"${zygote_dirs[@]}"}"; do
        [[ -S "$d/zygote.sock" || -d "$d" ]] && timeout 10 "$zbin" stop --runtime-dir "$d" >/dev/null 2>&1 || true
    done
    for pg in "${started[@]+"${started[@]}"}"; do
        kill -TERM -- "-$pg" 2>/dev/null || true
    done
    for pg in "${started[@]+"${started[@]}"}"; do
        for _ in $(seq 1 50); do kill -0 -- "-$pg" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pg" 2>/dev/null || true
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Stop one service started by start_*: graceful first, bounded, then KILL.
stop_group() {
    local pg="$1" rdir="${2:-}"
    if [[ -n "$rdir" ]]; then
        timeout 20 "$zbin" stop --runtime-dir "$rdir" >/dev/null 2>&1 || say "zygote stop failed for $rdir"
    else
        kill -TERM "$pg" 2>/dev/null || true
    fi
    for _ in $(seq 1 150); do kill -0 -- "-$pg" 2>/dev/null || break; sleep 0.1; done
    kill -TERM -- "-$pg" 2>/dev/null || true
    sleep 0.5
    kill -KILL -- "-$pg" 2>/dev/null || true
    local keep=() p
    for p in "${started[@]}"; do [[ "$p" != "$pg" ]] && keep+=("$p"); done
    started=("${keep[@]+"${keep[@]}"}")
}

# ------------------------------------------------------------ checks
need_python=1; need_zygote=1
[[ "$only" == zygote ]] && need_python=0
[[ "$only" == python ]] && need_zygote=0
command -v wrk >/dev/null || { say "wrk not found: run scripts/baseline/setup.sh (or apt-get install wrk)"; exit 1; }
if [[ $need_python == 1 && ! -x "$venv/bin/gunicorn" ]]; then
    say "no baseline venv at $venv: run scripts/baseline/setup.sh"; exit 1
fi
if [[ $need_zygote == 1 && ! -x "$zbin" ]]; then
    if [[ "$only" == zygote ]]; then say "no $zbin: cargo build --release"; exit 1; fi
    say "no $zbin (cargo build --release): measuring the Python baseline only"
    need_zygote=0
fi
model_dir="${ZYGOTE_MODEL-}"
if [[ -z "${ZYGOTE_MODEL+set}" && -x "$venv/bin/python" ]]; then
    model_dir="$("$venv/bin/python" "$repo/scripts/baseline/model_dir.py" 2>/dev/null || true)"
fi

bodies="$out/bodies.jsonl"
"${ctl[@]}" bodies "$helpers/sentences.txt" "$bodies" >/dev/null

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
    echo "cpu: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "load: wrk, $rounds rounds of $duration s per service (after one $warmup s warm-up), 2 x workers keep-alive connections, POST /embed one sentence each from scripts/bench-embed/sentences.txt"
    if [[ $need_python == 1 ]]; then
        echo "baseline: $("$venv/bin/python" -c 'from importlib.metadata import version as v; print("gunicorn", v("gunicorn"), "flask", v("flask"), "sentence-transformers", v("sentence-transformers"), "torch", v("torch"), "onnxruntime", v("onnxruntime"))')"
    fi
    if [[ $need_zygote == 1 ]]; then
        echo "zygote: $zbin ($(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')), model ${model_dir:-default}"
    fi
} | tee "$out/env.txt" >&2

# ------------------------------------------------------------ load
run_wrk() { # URL CONNS SECONDS OUTFILE
    local url="$1" conns="$2" secs="$3" file="$4" threads=2
    (( conns < threads )) && threads="$conns"
    run timeout $((secs + 30)) wrk -t "$threads" -c "$conns" -d "${secs}s" --timeout 10s \
        -s "$helpers/embed.lua" "$url" -- "$bodies" > "$file" 2>&1 || say "wrk exited $? (see $file)"
}

# warm SERVICE-INDEX: unmeasured load, right after the service is ready.
warm_seq=0
warm() {
    local i="$1" tag="${svc_tag[$1]}"
    [[ "$warmup" == 0 ]] && return 0
    say "$tag: warm-up ${warmup}s"
    run_wrk "${svc_url[$i]}" "$((2 * svc_n[$i]))" "$warmup" "$out/$tag.warmup.$((++warm_seq)).txt"
}

# load_round SERVICE-INDEX ROUND: one measured load -> TAG.wrk.ROUND.txt, TAG.cpu.ROUND.json
load_round() {
    local i="$1" r="$2" tag="${svc_tag[$1]}" conns=$((2 * svc_n[$1]))
    if [[ "$quiet_wait" != 0 ]]; then
        run "${ctl[@]}" idle-wait --max "$quiet_wait" > "$out/$tag.idle.$r.json" || true
    fi
    say "$tag: round $r of $rounds: load ${duration}s, $conns connections"
    "${ctl[@]}" cpu-monitor --seconds "$duration" "${svc_pg[$i]}" > "$out/$tag.cpu.$r.json" &
    local mon=$!
    helper_pids+=("$mon")
    run_wrk "${svc_url[$i]}" "$conns" "$duration" "$out/$tag.wrk.$r.txt"
    wait "$mon" || true
    forget "$mon"
    say "$tag: $(grep -h '^Requests/sec' "$out/$tag.wrk.$r.txt" || true); CPU $(cat "$out/$tag.cpu.$r.json")"
}

# alone SERVICE-INDEX: PSS and worker kills, while the service is the only one up (the PSS of
# shared library pages is split between every process that maps them, other services' too).
alone() {
    local i="$1" tag="${svc_tag[$1]}" pg="${svc_pg[$1]}" url="${svc_url[$1]}" rdir="${svc_rdir[$1]}"
    local conns=$((2 * svc_n[$1]))
    local pids="$pg"
    if [[ -n "$rdir" ]]; then
        pids="$pg $("${ctl[@]}" zygote-pids --zygote "$zbin" --runtime-dir "$rdir" || true)"
        timeout 10 "$zbin" status --runtime-dir "$rdir" --json > "$out/$tag.status.json" 2>&1 || true
    fi
    # shellcheck disable=SC2086
    python3 "$repo/scripts/pss.py" --json $pids > "$out/$tag.pss.json"
    python3 "$repo/scripts/pss.py" $pids > "$out/$tag.pss.txt" || true
    say "$tag: PSS $(tail -1 "$out/$tag.pss.txt")"
    say "$tag: $trials worker kills"
    if [[ -n "$rdir" ]]; then
        run "${ctl[@]}" restart --url "$url" --trials "$trials" --timeout 60 --pollers "$conns" \
            --zygote "$zbin" --runtime-dir "$rdir" --log "$out/$tag.log" > "$out/$tag.restart.json" || echo '{}' > "$out/$tag.restart.json"
    else
        run "${ctl[@]}" restart --url "$url" --trials "$trials" --timeout 120 --pollers "$conns" \
            --gunicorn-master "$pg" > "$out/$tag.restart.json" || echo '{}' > "$out/$tag.restart.json"
    fi
}

# ------------------------------------------------------------ services
# A new port for each service, so none meets the last one's TIME_WAIT sockets.
# (Sets $port; a $(...) subshell would lose the counter.)
port_seq=0
next_port() { port_seq=$((port_seq + 1)); port=$((base_port + port_seq)); }

# The services of the worker count being measured, by index: what they are, their process
# group, URL, zygote runtime directory (empty for gunicorn) and note.
svc_kind=(); svc_n=(); svc_tag=(); svc_pg=(); svc_url=(); svc_rdir=(); svc_note=()
add_service() { # KIND WORKERS TAG PGID URL RUNTIME_DIR NOTE
    svc_kind+=("$1"); svc_n+=("$2"); svc_tag+=("$3"); svc_pg+=("$4"); svc_url+=("$5")
    svc_rdir+=("$6"); svc_note+=("$7")
}

# start_python WORKERS VARIANT [PHASE]: VARIANT is seed, t1, t1-preload or seed-preload; PHASE
# (load) names the log and ready files of a second start.
start_python() {
    local n="$1" variant="$2" phase="${3:+.$3}" threads flag="" app=app port note tag
    case "$variant" in
        seed) threads=default; note="seed: torch threads default" ;;
        seed-preload) threads=default; flag=--preload; note="seed + preload" ;;
        t1) threads=1; note="1 torch thread per worker" ;;
        t1-preload) threads=1; flag=--preload; note="1 torch thread, preload" ;;
        ort) threads=1; flag=--preload; app=app_onnx; note="ONNX Runtime, 1 thread, preload" ;;
        *) say "unknown baseline variant $variant"; return 0 ;;
    esac
    next_port
    tag="python-w$n-$variant"
    say "$tag: starting gunicorn on 127.0.0.1:$port"
    local t0 tt=""; t0="$(date +%s.%N)"
    [[ "$threads" != default ]] && tt="$threads"
    TORCH_THREADS="$tt" ORT_THREADS=1 BASELINE_APP="$app" BASELINE_VENV="$venv" setsid "$repo/scripts/baseline/run.sh" "$n" "$port" $flag > "$out/$tag$phase.log" 2>&1 &
    local pg=$!
    started+=("$pg")
    if ! run "${ctl[@]}" wait-ready --url "http://127.0.0.1:$port" --workers "$n" --since "$t0" \
            --timeout 180 > "$out/$tag$phase.ready.json"; then
        say "$tag: not ready; see $out/$tag$phase.log"; stop_group "$pg"; return 0
    fi
    say "$tag: ready $(cat "$out/$tag$phase.ready.json")"
    add_service python "$n" "$tag" "$pg" "http://127.0.0.1:$port" "" "$note"
}

start_zygote() { # WORKERS FORM [PHASE]: FORM is the host compute copy's (--host-weights)
    local n="$1" form="$2" phase="${3:+.$3}" port rdir tag="zygote-w$1" note=""
    if [[ "$form" != f32 ]]; then tag+="-$form"; note="--host-weights $form"; fi
    if [[ "$form" == f32 && "$host_weights" != f32 ]]; then note="--host-weights f32"; fi
    next_port
    rdir="$(mktemp -d "$out/rt-$tag$phase.XXXX")"   # mode 0700
    zygote_dirs+=("$rdir")
    local args=(start --workers "$n" --listen "127.0.0.1:$port" --runtime-dir "$rdir" --host-weights "$form")
    [[ -n "$model_dir" ]] && args+=(--model "$model_dir")
    # shellcheck disable=SC2206
    [[ -n "${ZYGOTE_ARGS:-}" ]] && args+=(${ZYGOTE_ARGS})
    say "$tag: $zbin ${args[*]}"
    local t0; t0="$(date +%s.%N)"
    setsid "$zbin" "${args[@]}" > "$out/$tag$phase.log" 2>&1 &
    local pg=$!
    started+=("$pg")
    if ! run "${ctl[@]}" wait-ready --url "http://127.0.0.1:$port" --workers "$n" --since "$t0" \
            --timeout 120 --zygote "$zbin" --runtime-dir "$rdir" > "$out/$tag$phase.ready.json"; then
        say "$tag: not ready; see $out/$tag$phase.log"; stop_group "$pg" "$rdir"; return 0
    fi
    say "$tag: ready $(cat "$out/$tag$phase.ready.json")"
    add_service zygote "$n" "$tag" "$pg" "http://127.0.0.1:$port" "$rdir" "$note"
}

reset_services() { svc_kind=(); svc_n=(); svc_tag=(); svc_pg=(); svc_url=(); svc_rdir=(); svc_note=(); }
start_all() { # WORKERS [PHASE]
    if [[ $need_python == 1 ]]; then
        for v in $baselines; do start_python "$1" "$v" "${2:-}"; done
    fi
    if [[ $need_zygote == 1 ]]; then
        for f in $host_weights; do start_zygote "$1" "$f" "${2:-}"; done
    fi
}

# ------------------------------------------------------------ forward pass
# The single-thread forward pass of every engine, alternating within each round, before any
# service is up (forward.py speed; zygote's through its forward_bench example).
if [[ $need_python == 1 && " $baselines " == *" ort "* ]]; then
    "$venv/bin/python" "$repo/scripts/baseline/export_onnx.py" > "$out/onnx-path.txt" \
        || { say "the ONNX export failed (scripts/baseline/export_onnx.py)"; exit 1; }
fi
if [[ $need_python == 1 && "$forward_seconds" != 0 ]]; then
    fargs=(speed --seconds "$forward_seconds" --rounds "$rounds")
    if [[ $need_zygote == 1 && -x "$fbench" ]]; then
        fargs+=(--forward-bench "$fbench" --model "${model_dir:-$repo/models/all-MiniLM-L6-v2}"
                --host-weights "$(echo $host_weights | tr ' ' ',')")
    else
        say "no $fbench (cargo build --release -p zygote-embed --example forward_bench): zygote's forward pass left out"
    fi
    say "forward pass: ${forward_seconds}s per engine, $rounds rounds"
    run "$venv/bin/python" "$helpers/forward.py" "${fargs[@]}" > "$out/forward.txt" 2> "$out/forward.log" \
        || say "forward.py speed failed (see $out/forward.log)"
    grep -v '^{' "$out/forward.txt" >&2 || true
fi

for n in $workers_list; do
    # Phase 1, each service alone: its start-up, then (after a warm-up) its PSS and the kills.
    m_kind=(); m_tag=(); m_note=()
    if [[ $need_python == 1 ]]; then
        for v in $baselines; do
            reset_services
            start_python "$n" "$v"
            (( ${#svc_tag[@]} > 0 )) || continue
            warm 0; alone 0
            m_kind+=("${svc_kind[0]}"); m_tag+=("${svc_tag[0]}"); m_note+=("${svc_note[0]}")
            stop_group "${svc_pg[0]}" "${svc_rdir[0]}"
        done
    fi
    if [[ $need_zygote == 1 ]]; then
        for f in $host_weights; do
            reset_services
            start_zygote "$n" "$f"
            if (( ${#svc_tag[@]} > 0 )); then
                warm 0; alone 0
                m_kind+=("${svc_kind[0]}"); m_tag+=("${svc_tag[0]}"); m_note+=("${svc_note[0]}")
                stop_group "${svc_pg[0]}" "${svc_rdir[0]}"
            fi
        done
    fi
    # Phase 2, every service up at once (started one after the other), idle but for its own
    # turns: each round loads every service in turn, starting one further along each time, so
    # a drift of the machine's speed during the run weighs on every service alike.
    reset_services
    start_all "$n" load
    count=${#svc_tag[@]}
    for ((i = 0; i < count; i++)); do warm "$i"; done
    # The vectors each ONNX Runtime and zygote service serves, against sentence-transformers'.
    curls=()
    for ((i = 0; i < count; i++)); do
        case "${svc_tag[$i]}" in *-ort | zygote-*) curls+=(--url "${svc_tag[$i]}=${svc_url[$i]}") ;; esac
    done
    if [[ $need_python == 1 && ${#curls[@]} -gt 0 ]]; then
        run "$venv/bin/python" "$helpers/forward.py" cosine "${curls[@]}" > "$out/cosine-w$n.jsonl" \
            2> "$out/cosine-w$n.log" || say "forward.py cosine failed (see $out/cosine-w$n.log)"
        say "cosine to sentence-transformers: $(tr '\n' ' ' < "$out/cosine-w$n.jsonl")"
    fi
    for ((r = 1; r <= rounds; r++)); do
        for ((j = 0; j < count; j++)); do load_round "$(( (j + r - 1) % count ))" "$r"; done
    done
    for ((i = 0; i < count; i++)); do stop_group "${svc_pg[$i]}" "${svc_rdir[$i]}"; done
    for ((i = 0; i < ${#m_tag[@]}; i++)); do
        "${ctl[@]}" merge --service "${m_kind[$i]}" --workers "$n" --note "${m_note[$i]}" \
            --rounds "$rounds" "$out/${m_tag[$i]}" >> "$results"
    done
done

{
    "${ctl[@]}" report "$results"
    if [[ -s "$out/forward.txt" ]]; then
        echo
        echo "Single-thread forward pass (texts per second of CPU time, one text per call, the benchmark's sentences):"
        grep -v '^{' "$out/forward.txt"
    fi
    if compgen -G "$out/cosine-w*.jsonl" >/dev/null; then
        echo
        echo "Lowest cosine to sentence-transformers over the benchmark's sentences:"
        echo
        echo "| service | lowest cosine |"
        echo "| --- | --- |"
        cat "$out"/cosine-w*.jsonl | python3 -c 'import json, sys
for line in sys.stdin:
    if line.strip():
        d = json.loads(line)
        print("| %s | %.6f |" % (d["source"], d["min_cosine"]))'
    fi
} | tee "$out/table.md"
say "logs and raw results in $out"
