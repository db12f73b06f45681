#!/usr/bin/env bash
# Start the seed 002 baseline: gunicorn -w WORKERS -b 127.0.0.1:PORT app:app
#
#   scripts/baseline/run.sh WORKERS PORT [--preload] [extra gunicorn args...]
#
# TORCH_THREADS=N in the environment sets torch's intra-op threads per worker
# (OMP_NUM_THREADS and MKL_NUM_THREADS). Unset, torch uses one per core in
# every worker, as the seed does; with several workers on few cores those
# OpenMP threads oversubscribe the CPU and slow every request down, and
# TORCH_THREADS=1 is what a tuned deployment of the seed would set.
#
# No --preload by default, as in seed 002: every worker imports app.py and
# loads its own copy of the model. --preload loads it once in the master
# before forking (works on CPU; with CUDA it is what breaks in seed 000/002).
# The process exec'd is the gunicorn master, so $! of a caller is its pid.
# BASELINE_APP=app_onnx serves the ONNX Runtime baseline instead (app_onnx.py,
# one intra-op thread per worker unless ORT_THREADS says otherwise; the model
# exported by export_onnx.py, which setup.sh runs).
# Run scripts/baseline/setup.sh first.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 WORKERS PORT [--preload] [gunicorn args...]" >&2
    exit 2
fi
workers="$1"; port="$2"; shift 2

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${BASELINE_VENV:-$repo/.venv-baseline}"
if [[ ! -x "$venv/bin/gunicorn" ]]; then
    echo "run.sh: no gunicorn in $venv; run scripts/baseline/setup.sh first" >&2
    exit 1
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ -n "${TORCH_THREADS:-}" ]]; then
    export OMP_NUM_THREADS="$TORCH_THREADS" MKL_NUM_THREADS="$TORCH_THREADS"
fi
# --no-control-socket: gunicorn 27 otherwise opens one fixed control socket
# per user, which two baselines running side by side would fight over. It
# has no part in serving requests.
exec "$venv/bin/gunicorn" --chdir "$here" --no-control-socket \
    -w "$workers" -b "127.0.0.1:$port" "$@" "${BASELINE_APP:-app}:app"
