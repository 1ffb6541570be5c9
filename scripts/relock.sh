#!/usr/bin/env bash
# Re-lock: write requirements.lock, the exact version of every direct and transitive dependency
# that install.sh (and so CI) installs, for CPython 3.11 on Linux x86_64, with `uv pip compile`.
#
#   bash scripts/relock.sh                    re-resolve, keeping every pin the ranges still allow
#                                             (after editing pyproject.toml's dependencies)
#   bash scripts/relock.sh --upgrade          everything to the newest the ranges allow
#   bash scripts/relock.sh --upgrade-package transformers   one package to its newest
#   bash scripts/relock.sh --from-venv DIR    pin exactly what is installed in the virtual
#                                             environment DIR (one the test suite just passed in)
#
# The lock holds the versions the test suite passed with: after --upgrade, run
# `bash install.sh && .venv/bin/python -m pytest` and commit the lock only if it passes.
# uv comes from PyPI, pinned, into .venv (it does not read pip's configuration, so this
# machine's find-links, where the CPU torch lies, is passed to it here).
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.8
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ "$(.venv/bin/uv --version 2>/dev/null)" != "uv $UV_VERSION" ]; then
  .venv/bin/python -m pip install --disable-pip-version-check -q "uv==$UV_VERSION" 2> >(grep -v "is ignored: it is neither" >&2)
fi

args=()
constraints=(--constraint scripts/lock-constraints.txt)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
while [ $# -gt 0 ]; do
  case "$1" in
    --from-venv)
      [ -x "${2:-}/bin/python" ] || { echo "relock.sh: --from-venv needs a virtual environment directory, got '${2:-}'" >&2; exit 2; }
      "$2/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null \
        | grep -E '^[A-Za-z0-9._-]+==' > "$tmp/installed.txt"
      constraints+=(--constraint "$tmp/installed.txt"); shift 2 ;;
    --upgrade|-U) args+=(--upgrade); shift ;;
    --upgrade-package|-P) args+=(--upgrade-package "$2"); shift 2 ;;
    *) echo "relock.sh: unknown option '$1'; accepted: --upgrade, --upgrade-package NAME, --from-venv DIR" >&2; exit 2 ;;
  esac
done

# pip's find-links (this machine: /opt/wheels, where torch 2.13.0+cpu lies), not written into the lock
links=()
for dir in ${PIP_FIND_LINKS:-$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)}; do
  links+=(--find-links "$dir")
done

# uv reads the pins of the file it writes to as preferences: start from the current lock
[ -f requirements.lock ] && cp requirements.lock "$tmp/out.lock"
.venv/bin/uv pip compile pyproject.toml --extra dev --extra export "${constraints[@]}" "${links[@]}" "${args[@]}" \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match \
  --custom-compile-command "bash scripts/relock.sh" --no-annotate --no-progress --quiet --output-file "$tmp/out.lock"
{
  echo "# requirements.lock: the exact versions install.sh installs and the test suite passed with."
  echo "# Compiled for CPython 3.11 on Linux x86_64 (manylinux_2_28) from pyproject.toml (+ the dev"
  echo "# and export extras) and scripts/lock-constraints.txt by uv pip compile. Do not edit by hand: re-lock with"
  echo "# \`bash scripts/relock.sh\` (see its header). torch is the CPU build: pip finds it in find-links"
  echo "# (on this project's machines /opt/wheels) or at https://download.pytorch.org/whl/cpu."
  # the --from-venv constraints are a temporary file: name what they were instead
  sed "s|-c $tmp/installed.txt|-c (the --from-venv environment)|g" "$tmp/out.lock"
} > "$tmp/new.lock"
if grep -qiE '^nvidia-|^triton==' "$tmp/new.lock"; then
  echo "relock.sh: the resolution pulled CUDA packages (nvidia-*/triton): torch is not the CPU build" >&2; exit 1
fi
mv "$tmp/new.lock" requirements.lock
echo "relock.sh: wrote requirements.lock ($(grep -cE '^[A-Za-z0-9._-]+==' requirements.lock) packages)"
