#!/usr/bin/env bash
# Build the wheel, install it into a fresh venv that has no Cython and no
# compiler on PATH, and check that it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip wheel -q --no-deps -w "$work/wheels" .
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$work"/wheels/octo_proxy-*.whl
# no compiler and no Cython reachable from the fresh venv
mkdir -p "$work/nocc"
for cc in gcc cc g++ clang; do printf '#!/bin/sh\necho "no compiler here" >&2; exit 1\n' > "$work/nocc/$cc"; chmod +x "$work/nocc/$cc"; done
export PATH="$work/nocc:$work/venv/bin:$PATH"
cd "$work"
if python -c "import Cython" 2>/dev/null; then echo "Cython leaked into the venv" >&2; exit 1; fi
octo-proxy version
python -c "import octoproxy._core.frame, octoproxy._core.route; print('core imported from', octoproxy._core.frame.__file__)"
for f in "$OLDPWD"/examples/*.yaml; do
  case "$f" in *endpoints*.yaml) continue;; esac
  octo-proxy validate -c "$f"
done
echo "wheel check: ok"
