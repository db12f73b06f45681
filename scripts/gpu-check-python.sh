#!/usr/bin/env bash
# The GPU check of Python apps (issue 12, item 11): one command on a machine with an NVIDIA GPU.
#
#   scripts/gpu-check-python.sh [--workers N] [--device D] [--out DIR]
#
# Needs: scripts/python-setup.sh (the .venv-python with torch and the zygote package),
# target/release/zygote (or ZYGOTE_BIN), the model in models/all-MiniLM-L6-v2. Prints:
#
#   1. the VRAM of one empty torch process (CUDA initialised, one tiny tensor): the context
#      every worker pays;
#   2. the ported seed 002 app (examples/python/seed002) under `zygote start --backend cuda
#      --ipc vmm --app main:app` with N workers: start -> all serving, the answers for the
#      fixture's sentences against sentence-transformers' vectors (cosine >= 0.9999), and
#      nvidia-smi's VRAM of the whole service and of each process;
#   3. the target: VRAM in total <= 1 x weights + N x the empty process's context (the owner's
#      own context is listed apart).
#
# Every process it starts runs in its own session and is stopped on exit; every wait has a
# deadline. Everything is also written to --out (default bench-out/gpu-check-python).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

workers=4
device=0
out="$repo/bench-out/gpu-check-python"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --workers) workers="$2"; shift 2 ;;
        --device) device="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "gpu-check-python.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
zbin="${ZYGOTE_BIN:-$repo/target/release/zygote}"
py="${PYTHON_VENV:-$repo/.venv-python}/bin/python"
model="${ZYGOTE_MODEL_DIR:-$repo/models/all-MiniLM-L6-v2}"
port="${PORT:-18700}"
for need in "$zbin" "$py" "$model/model.safetensors"; do
    [[ -e "$need" ]] || { echo "gpu-check-python.sh: $need is missing (see --help)" >&2; exit 1; }
done
command -v nvidia-smi >/dev/null || {
    echo "nvidia-smi not found: this check needs an NVIDIA GPU and its driver" >&2
    exit 1
}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES="$device"

pgids=()
cleanup() {
    for g in "${pgids[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
    sleep 1
    for g in "${pgids[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
}
trap cleanup EXIT

used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$device" | tr -d ' '; }
per_process() {
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -i "$device" \
        | tr -d ' ' || true
}
nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version --format=csv -i "$device" \
    | tee "$out/gpu.txt"

# 1. One empty torch process.
base="$(used)"
fifo="$out/empty.fifo"
rm -f "$fifo"; mkfifo "$fifo"
setsid "$py" -c 'import sys, torch; torch.zeros(1, device="cuda"); print("up", flush=True); sys.stdin.read()' \
    <"$fifo" >"$out/empty.log" 2>&1 &
empty=$!
pgids+=("$empty")
exec 7>"$fifo"
for _ in $(seq 1 600); do grep -q up "$out/empty.log" && break; sleep 0.1; done
grep -q up "$out/empty.log" || { echo "the empty torch process did not start:" >&2; cat "$out/empty.log" >&2; exit 1; }
ctx=$(( $(used) - base ))
echo "empty torch process: $ctx MiB of VRAM"
exec 7>&-
wait "$empty" 2>/dev/null || true

# 2. The ported app under zygote with the CUDA backend.
base="$(used)"
rdir="$out/rt"
start_s="$(date +%s.%N)"
PATH="$(dirname "$py"):$PATH" setsid "$zbin" start --model "$model" --backend cuda --ipc vmm \
    --app main:app --app-dir "$repo/examples/python/seed002" --workers "$workers" \
    --listen "127.0.0.1:$port" --runtime-dir "$rdir" >"$out/service.log" 2>&1 &
sup=$!
pgids+=("$sup")
for _ in $(seq 1 6000); do
    grep -q "all $workers workers serving" "$out/service.log" && break
    kill -0 "$sup" 2>/dev/null || { echo "the service stopped:" >&2; tail -40 "$out/service.log" >&2; exit 1; }
    sleep 0.1
done
grep -q "all $workers workers serving" "$out/service.log" \
    || { echo "not serving after 600 s:" >&2; tail -40 "$out/service.log" >&2; exit 1; }
ready_s=$(python3 -c "import time; print(round(time.time() - $start_s, 1))")
"$py" - "$port" "$repo/examples/embed/tests/fixtures/minilm_reference.json" <<'PY' | tee "$out/answers.txt"
import json, sys, urllib.request
import torch
port, fixture = sys.argv[1], json.load(open(sys.argv[2]))
got = []
for i in range(0, len(fixture["sentences"]), 8):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/embed",
        data=json.dumps({"input": fixture["sentences"][i:i + 8]}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        got += [d["embedding"] for d in json.loads(r.read())["data"]]
cos = torch.nn.functional.cosine_similarity(torch.tensor(got), torch.tensor(fixture["embeddings"]))
print(f"answers: {len(got)} sentences, min cosine {cos.min().item():.6f} "
      f"({'ok' if cos.min().item() >= 0.9999 else 'BELOW 0.9999'})")
PY
total=$(( $(used) - base ))
weights_bytes="$(grep -o 'bytes=[0-9]*' "$out/service.log" | head -1 | cut -d= -f2)"
weights_mib=$(( ${weights_bytes:-0} / 1048576 ))
owner_pid="$(grep -o 'owner 0 (pid [0-9]*' "$out/service.log" | head -1 | grep -o '[0-9]*$')"
per_process | tee "$out/per-process.csv"
owner_mib="$(per_process | awk -F, -v p="$owner_pid" '$1 == p {print $2}')"
"$zbin" status --runtime-dir "$rdir" | tee "$out/status.txt"
grep -E "ready in|backend" "$out/service.log" | head -12 >"$out/ready.txt" || true

# 3. The summary.
{
    echo
    echo "| what | value |"
    echo "| --- | --- |"
    echo "| workers | $workers |"
    echo "| start -> all serving | ${ready_s} s |"
    echo "| compute copy of the weights | ${weights_mib} MiB |"
    echo "| empty torch process (one context) | ${ctx} MiB |"
    echo "| VRAM of the whole service (nvidia-smi delta) | ${total} MiB |"
    echo "| of which the owner process | ${owner_mib:--} MiB |"
    echo "| target: weights + $workers x context | $(( weights_mib + workers * ctx )) MiB (+ the owner's context) |"
} | tee "$out/summary.md"
kill -TERM "$sup" 2>/dev/null || true
wait "$sup" 2>/dev/null || true
