#!/usr/bin/env bash
# Validates deploy/kubernetes.yaml offline against the Kubernetes schemas (strict: unknown
# fields are errors), with kubernetes-validate from .venv-python (installed there if missing).
#
# usage: scripts/validate-deploy.sh
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv-python"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
[[ -x "$venv/bin/kubernetes-validate" ]] || "$venv/bin/pip" install -q kubernetes-validate
for version in 1.37 1.30; do
    "$venv/bin/kubernetes-validate" --strict -k "$version" "$repo_root/deploy/kubernetes.yaml"
done
