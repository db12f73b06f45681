#!/usr/bin/env bash
# Create the test virtualenv of the `zygote` Python package and install the package into it.
#
#   scripts/python-setup.sh            # .venv-python in the repository root
#   PYTHON_VENV=/some/dir scripts/python-setup.sh
#   .venv-python/bin/pytest python/tests
#
# Idempotent: the pinned requirements (scripts/python-requirements.txt, which includes the
# seed 002 baseline's) are installed only when their hash changed, and the package
# (`pip install ./python`, a release build of the PyO3 extension by maturin) only when a
# tracked file of python/ or runtime/ changed; otherwise it only checks the imports. torch
# pulls its CUDA runtime wheels (about 3 GiB); they are needed for 'import torch' on CPU too.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
venv="${PYTHON_VENV:-$repo/.venv-python}"
req="$here/python-requirements.txt"
python="${PYTHON:-python3}"

req_stamp="$venv/.requirements.sha256"
req_want="$(cat "$req" "$here/baseline/requirements.txt" | sha256sum | cut -d' ' -f1)"
pkg_stamp="$venv/.zygote-package.sha256"
pkg_want="$(cd "$repo" && git ls-files -s python runtime Cargo.toml Cargo.lock | sha256sum | cut -d' ' -f1)"
# Uncommitted changes count too.
pkg_want="$pkg_want-$(cd "$repo" && git diff HEAD -- python runtime | sha256sum | cut -d' ' -f1)"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "python-setup.sh: creating $venv with $("$python" --version)"
    "$python" -m venv "$venv"
fi
if [[ ! -f "$req_stamp" || "$(cat "$req_stamp")" != "$req_want" ]]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    echo "python-setup.sh: installing scripts/python-requirements.txt (torch and its CUDA wheels are large)"
    "$venv/bin/python" -m pip install --progress-bar off -r "$req"
    echo "$req_want" > "$req_stamp"
fi
if [[ ! -f "$pkg_stamp" || "$(cat "$pkg_stamp")" != "$pkg_want" ]] \
    || ! "$venv/bin/python" -c "import zygote._native" 2>/dev/null; then
    echo "python-setup.sh: building and installing the zygote package (pip install ./python)"
    # The venv's maturin is the pinned one; no build isolation, so nothing is fetched here.
    CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}" PATH="$venv/bin:$PATH" \
        "$venv/bin/python" -m pip install --no-build-isolation --no-deps --force-reinstall \
        --progress-bar off "$repo/python"
    echo "$pkg_want" > "$pkg_stamp"
fi
HF_HUB_OFFLINE=1 "$venv/bin/python" - <<'PY'
from importlib.metadata import version
import a2wsgi, fastapi, flask, prometheus_client, sentence_transformers, torch, uvicorn, zygote, zygote.torch
print(f"python venv ok: zygote {version('zygote')} ({zygote._native.__file__}), torch "
      f"{torch.__version__}, sentence-transformers {version('sentence-transformers')}, "
      f"uvicorn {version('uvicorn')}, fastapi {version('fastapi')}")
PY
