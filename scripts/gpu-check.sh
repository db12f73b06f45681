#!/usr/bin/env bash
# The GPU check of the CUDA backend: one command on a machine with an NVIDIA GPU.
#
# It builds nothing. Build the release binaries first:
#
#     cargo build --release --bin zygote --example cuda_roundtrip
#     scripts/gpu-check.sh [--workers N] [--model-mib MIB | --model PATH] [--device D]
#                          [--entry NAME] [--http PATH] [--port P] [--bin DIR] [--out DIR]
#                          [--skip-service] [--skip-baseline]
#
# and it prints, for a model of at least 1 GiB (without --model: a synthetic BF16 one, 1100 MiB
# on disk and twice that as the f32 compute copy on the device):
#
#   1. cuda_roundtrip (VMM, then legacy IPC): owner export, spawn → ready p50 of N importers
#      and its import part (context, map, digest), the digest check (a wrong digest is
#      refused), VRAM per importer, and with VMM: importers still verified after kill -9 of the
#      owner, a new importer served from the kept fds, and a new owner adopting the weights;
#   2. the service: `zygote start --backend cuda --ipc vmm` with N workers; VRAM of the whole
#      service, start → all serving, kill -9 of the owner (workers keep serving: same pids, no
#      restarts, and HTTP answers when --http names a path the entry serves), the owner back,
#      and a worker restart → serving;
#   3. the anchor: N processes that each load the model onto the GPU with torch
#      (scripts/gpu_baseline.py), their VRAM and load time;
#   4. a summary table. Everything is also written to --out (default bench-out/gpu-check).
#
# GPU_CHECK_DRY_RUN=1 runs every step even where CUDA is unavailable (to test this script).
#
# Targets (issue 3): VRAM of N workers ≈ one model + N contexts; spawn → ready ≤ 300 ms p50.
set -euo pipefail
cd "$(dirname "$0")/.."

workers=4
model=""
model_mib=1100
device=0
entry=probe
http=""
port=18731
bin=target/release
out=bench-out/gpu-check
skip_service=0
skip_baseline=0
while [ $# -gt 0 ]; do
    case "$1" in
        --workers) workers=$2; shift 2 ;;
        --model) model=$2; shift 2 ;;
        --model-mib) model_mib=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        --entry) entry=$2; shift 2 ;;
        --http) http=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --skip-service) skip_service=1; shift ;;
        --skip-baseline) skip_baseline=1; shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

zygote="$bin/zygote"
roundtrip="$bin/examples/cuda_roundtrip"
for f in "$zygote" "$roundtrip"; do
    if [ ! -x "$f" ]; then
        echo "$f is missing: run 'cargo build --release --bin zygote --example cuda_roundtrip' first" >&2
        exit 2
    fi
done
if ! command -v nvidia-smi >/dev/null; then
    echo "nvidia-smi not found: this check needs an NVIDIA GPU and its driver" >&2
    exit 2
fi
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
vram_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$device" | head -1 | tr -d ' '; }
now_ms() { date +%s%3N; }

echo "== GPU"
nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version --format=csv -i "$device" | tee "$out/gpu.txt"

echo "== model"
if [ -z "$model" ]; then
    model="$out/model-${model_mib}mib.safetensors"
    if [ ! -s "$model" ]; then
        "$roundtrip" --write-model "$model" --mib "$model_mib"
    fi
fi
model_bytes=$(stat -c %s "$model")
note "model: $model ($((model_bytes >> 20)) MiB on disk)"

echo "== 1. cuda_roundtrip, VMM ($workers importers)"
set +e
"$roundtrip" --model "$model" --children "$workers" --ipc vmm --device "$device" 2>"$out/roundtrip-vmm.log" | tee "$out/roundtrip-vmm.txt"
rt_vmm=${PIPESTATUS[0]}
echo "== 1b. cuda_roundtrip, legacy IPC (2 importers)"
"$roundtrip" --model "$model" --children 2 --ipc legacy --device "$device" 2>"$out/roundtrip-legacy.log" | tee "$out/roundtrip-legacy.txt"
rt_legacy=${PIPESTATUS[0]}
set -e
if [ "${GPU_CHECK_DRY_RUN:-0}" = 0 ] && grep -q "CUDA is unavailable" "$out/roundtrip-vmm.txt"; then
    echo "CUDA is not usable from this process (see above); nothing was measured" >&2
    exit 2
fi

svc_vram="-"; svc_start_ms="-"; owner_kill="-"; restart_ms="-"; svc_ok="skipped"
if [ "$skip_service" = 0 ]; then
    echo "== 2. the service: zygote start --backend cuda --ipc vmm --workers $workers --entry $entry"
    rd=$(mktemp -d /tmp/zygote-gpu-check.XXXXXX)
    chmod 700 "$rd"
    status_json() { "$zygote" status --runtime-dir "$rd" --json 2>/dev/null; }
    # Prints "<serving workers> <owner pid> <owner state> <worker pids> <worker restarts>".
    summarise() {
        status_json | python3 -c '
import json, sys
s = json.load(sys.stdin)
ws = [p for p in s["processes"] if p["role"] == "worker"]
os_ = [p for p in s["processes"] if p["role"] == "owner"]
serving = sum(1 for p in ws if p["state"] == "serving")
owner = os_[0] if os_ else {"pid": 0, "state": "none"}
print(serving, owner["pid"], owner["state"], ",".join(str(p["pid"]) for p in sorted(ws, key=lambda p: p.get("slot") or 0)), sum(p["restarts"] for p in ws))
' 2>/dev/null || echo "0 0 none - 0"
    }
    wait_serving() { # wait_serving N DEADLINE_S [GONE_PID]: until N workers serve (without GONE_PID)
        local want=$1 deadline=$(( $(date +%s) + $2 )) gone=${3:-} serving owner state pids rest
        while [ "$(date +%s)" -lt "$deadline" ]; do
            kill -0 "$svc" 2>/dev/null || return 1  # the service ended
            read -r serving owner state pids rest <<<"$(summarise)"
            if [ "$serving" -ge "$want" ] && { [ -z "$gone" ] || [[ ",$pids," != *",$gone,"* ]]; }; then
                return 0
            fi
            sleep 0.02
        done
        return 1
    }
    probe_http() { # probe_http N: N requests, prints how many succeeded
        local ok=0
        for _ in $(seq "$1"); do
            curl -sf -m 2 "http://127.0.0.1:$port$http" >/dev/null 2>&1 && ok=$((ok + 1))
        done
        echo "$ok"
    }
    base=$(vram_used)
    t0=$(now_ms)
    "$zygote" start --model "$model" --workers "$workers" --backend cuda --ipc vmm \
        --entry "$entry" --runtime-dir "$rd" --listen "127.0.0.1:$port" --timeout 5 \
        >"$out/service.log" 2>&1 &
    svc=$!
    if wait_serving "$workers" 300; then
        svc_start_ms=$(( $(now_ms) - t0 ))
        sleep 1
        svc_vram=$(( $(vram_used) - base ))
        status_json > "$out/status-serving.json"
        "$zygote" status --runtime-dir "$rd" | tee -a "$summary"
        note "service: $workers workers serving $svc_start_ms ms after start; VRAM of the whole service $svc_vram MiB"
        read -r _ owner_pid _ pids_before restarts_before <<<"$(summarise)"
        [ -n "$http" ] && note "HTTP before the owner's death: $(probe_http 20)/20 answered"
        kill -9 "$owner_pid"
        note "owner (pid $owner_pid) killed with SIGKILL"
        answered="-"
        [ -n "$http" ] && answered=$(probe_http 50)
        # Longer than --timeout: a worker that stopped heartbeating would be killed by now.
        sleep 7
        read -r serving owner_after owner_state pids_after restarts_after <<<"$(summarise)"
        if [ "$pids_after" = "$pids_before" ] && [ "$restarts_after" = "$restarts_before" ] && [ "$serving" -ge "$workers" ]; then
            owner_kill="workers kept serving (same pids, no restarts)"
        else
            owner_kill="WORKERS DISTURBED: pids $pids_before -> $pids_after, restarts $restarts_before -> $restarts_after"
        fi
        [ -n "$http" ] && owner_kill="$owner_kill; HTTP $answered/50 answered right after the kill"
        note "after kill -9 of the owner: $owner_kill; owner now pid $owner_after ($owner_state)"
        status_json > "$out/status-after-owner-kill.json"
        # One worker restart, timed by polling the status every 20 ms.
        victim=${pids_after%%,*}
        t1=$(now_ms)
        kill -9 "$victim"
        if wait_serving "$workers" 120 "$victim"; then
            restart_ms=$(( $(now_ms) - t1 ))
            note "worker $victim killed: $workers serving again after $restart_ms ms (status polling, ±20 ms)"
        else
            note "worker $victim killed: NOT serving again within 120 s"
        fi
        svc_ok=ok
    else
        note "the service did not reach $workers serving workers within 300 s; see $out/service.log"
        svc_ok=failed
    fi
    "$zygote" stop --runtime-dir "$rd" >/dev/null 2>&1 || kill "$svc" 2>/dev/null || true
    wait "$svc" 2>/dev/null || true
    rm -rf "$rd"
fi

base_json='{}'
if [ "$skip_baseline" = 0 ]; then
    echo "== 3. anchor: $workers processes that each load the model onto the GPU (torch)"
    if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
        base_json=$(python3 scripts/gpu_baseline.py --model "$model" --procs "$workers" --device "$device" | tail -1)
        echo "$base_json" | tee "$out/baseline.json"
    else
        note "anchor skipped: python3 with a CUDA-enabled torch is not installed"
    fi
fi

echo
echo "== summary" | tee -a "$summary"
python3 - "$out" "$workers" "$model_bytes" "$svc_vram" "$svc_start_ms" "$restart_ms" "$owner_kill" "$base_json" "$rt_vmm" "$rt_legacy" "$svc_ok" <<'EOF' | tee -a "$summary"
import json, re, sys
out, workers, model_bytes, svc_vram, svc_start, restart, owner_kill, base, rt_vmm, rt_legacy, svc_ok = sys.argv[1:]
text = open(f"{out}/roundtrip-vmm.txt").read()
def grab(pattern, default="-"):
    m = re.search(pattern, text)
    return m.group(1) if m else default
base = json.loads(base) if base.strip() else {}
m = re.search(r"owner: VRAM used (\d+) MiB before the export, (\d+) MiB after", text)
weights = f"{int(m.group(2)) - int(m.group(1))} MiB" if m else "-"
rows = [
    ("model on disk", f"{int(model_bytes) >> 20} MiB"),
    ("weights on the device (f32 compute copy)", weights),
    (f"VRAM, zygote service, {workers} workers (nvidia-smi)", f"{svc_vram} MiB"),
    (f"VRAM, {workers} self-loading torch processes (nvidia-smi)", f"{base.get('vram_delta_mib', '-')} MiB"),
    ("VRAM per importer (cuMemGetInfo delta)", " ".join(re.findall(r"\(\+(\d+) MiB\)", text)) + " MiB" if "(+" in text else "-"),
    ("spawn → ready p50 (roundtrip)", grab(r"spawn→ready p50 ([\d.]+) ms") + " ms"),
    ("  of which import (context+map+digest) p50", grab(r"import part p50 ([\d.]+) ms") + " ms"),
    ("  first importer's parts", grab(r"importer 0: spawn→ready [\d.]+ ms \(([^)]*)\)")),
    ("torch self-load p50 per process", f"{base.get('load_ms_p50', '-')} ms"),
    ("digest check", "a wrong digest is refused" if "digest check: a manifest with a wrong digest is refused" in text else "NOT SHOWN"),
    ("owner kill -9 (roundtrip, VMM)", "importers re-verified, new importer served, new owner adopted"
        if all(s in text for s in ("after the owner's death", "with no owner alive", "adopted generation")) else "NOT SHOWN"),
    ("owner kill -9 (service)", owner_kill),
    ("service start → all serving", f"{svc_start} ms"),
    ("worker restart → serving (service)", f"{restart} ms"),
    ("roundtrip exit codes (vmm, legacy)", f"{rt_vmm}, {rt_legacy}"),
    ("service", svc_ok),
]
width = max(len(k) for k, _ in rows)
for k, v in rows:
    print(f"{k:<{width}}  {v}")
EOF
if [ "$rt_vmm" != 0 ] || [ "$rt_legacy" != 0 ] || [ "$svc_ok" = failed ]; then
    echo "GPU check FAILED (see $out)" >&2
    exit 1
fi
echo "GPU check done; figures in $summary"
