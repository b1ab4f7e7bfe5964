#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# the cluster-quota tests start real redis-server processes
if ! command -v redis-server >/dev/null; then
  apt-get install -y redis-server || { apt-get update && apt-get install -y redis-server; }
fi
# the core's service authentication links OpenSSL's libcrypto (docs/auth.md)
if [ ! -f /usr/include/openssl/hmac.h ]; then
  apt-get install -y libssl-dev || { apt-get update && apt-get install -y libssl-dev; }
fi
python -m pip install -q --upgrade pip "setuptools>=77" wheel  # setup.py build_ext --inplace needs the SPDX license support
OCTOPROXY_WERROR=1 python -m pip install -q -e ".[dev]"  # warnings are errors in CI
ruff check src tests bench
cython-lint src/octoproxy/_core/
# tests/container needs the engine (podman + runc from Debian): installed here
# when we are root; in CI (CI=true) those tests must run, never skip
if [ "$(id -u)" = 0 ]; then bash ci/container.sh setup; fi
if [ "${CI:-}" = true ]; then export OCTO_REQUIRE_CONTAINERS=1; fi
mypy src/octoproxy
python ci/check_docs.py   # links, repo paths, test names, protocol.md sections
python -m pytest -q -p no:cacheprovider "$@"
# the wheel installs and runs without a compiler or Cython (prints "wheel check: ok" last)
bash ci/wheel_check.sh
