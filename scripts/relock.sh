#!/usr/bin/env bash
# Re-lock: write requirements.lock, the exact version of every direct and transitive dependency
# that install.sh (and so CI) installs, for CPython 3.11, 3.12 and 3.13 on Linux x86_64, with
# `uv pip compile`: resolved once per Python, and refused unless the three agree (one lock, no
# markers, so every Python gets the versions the tests passed with). Also scripts/torch-cuda.lock:
# the packages PyPI's torch (the CUDA build) adds, for machines where no CPU build can be had.
#
#   bash scripts/relock.sh                    re-resolve, keeping every pin the ranges still allow
#                                             (after editing pyproject.toml's dependencies)
#   bash scripts/relock.sh --upgrade          everything to the newest the ranges allow
#   bash scripts/relock.sh --upgrade-package transformers   one package to its newest
#   bash scripts/relock.sh --from-venv DIR    pin exactly what is installed in the virtual
#                                             environment DIR (one the test suite just passed in)
#
# The lock holds the versions the test suite passed with: after --upgrade, run
# `bash install.sh && .venv/bin/python -m pytest` (and scripts/test-latest.sh on another Python)
# and commit the lock only if it passes. uv comes from PyPI, pinned, into .venv. torch is resolved
# from PyPI with its CPU build's dependencies (scripts/uv-torch-cpu.toml); the lock pins its
# version, install.sh picks its build (scripts/torch.sh).
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
        | grep -E '^[A-Za-z0-9._-]+==' | grep -v '^torch==' > "$tmp/installed.txt"  # torch: the lock's version
      constraints+=(--constraint "$tmp/installed.txt"); shift 2 ;;
    --upgrade|-U) args+=(--upgrade); shift ;;
    --upgrade-package|-P) args+=(--upgrade-package "$2"); shift 2 ;;
    *) echo "relock.sh: unknown option '$1'; accepted: --upgrade, --upgrade-package NAME, --from-venv DIR" >&2; exit 2 ;;
  esac
done

PYTHONS=(3.11 3.12 3.13)  # pyproject.toml's requires-python, and what install.sh accepts
torch_pin=$(sed -nE 's/^torch==(.*)/\1/p' scripts/lock-constraints.txt)
grep -q "^version = \"$torch_pin\"" scripts/uv-torch-cpu.toml \
  || { echo "relock.sh: scripts/uv-torch-cpu.toml describes another torch than lock-constraints.txt's $torch_pin" >&2; exit 1; }
compile() {  # compile PYTHON_VERSION OUTPUT INPUT... [OPTIONS]: one resolution for Linux x86_64
  local version=$1 out=$2; shift 2
  # uv reads the pins of the file it writes to as preferences: start from the current lock
  [ -f requirements.lock ] && cp requirements.lock "$out"
  .venv/bin/uv pip compile "$@" --python-version "$version" --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "bash scripts/relock.sh" --no-annotate --no-header --no-progress --quiet \
    --output-file "$out"
}
pins() { grep -E '^[A-Za-z0-9._-]+==' "$1"; }
for version in "${PYTHONS[@]}"; do
  compile "$version" "$tmp/py$version.lock" pyproject.toml --extra dev --extra export \
    --config-file scripts/uv-torch-cpu.toml "${constraints[@]}" "${args[@]}"
  if ! diff <(pins "$tmp/py${PYTHONS[0]}.lock") <(pins "$tmp/py$version.lock") > "$tmp/diff"; then
    echo "relock.sh: Python $version resolves other versions than ${PYTHONS[0]} (< ${PYTHONS[0]}, > $version):" >&2
    cat "$tmp/diff" >&2; exit 1
  fi
done
if grep -qiE '^(nvidia-|cuda-|triton==)' "$tmp/py${PYTHONS[0]}.lock"; then
  echo "relock.sh: the resolution pulled CUDA packages (nvidia-*/cuda-*/triton): torch's CPU metadata was not used" >&2; exit 1
fi
{
  echo "# requirements.lock: the exact versions install.sh installs and the test suite passed with."
  echo "# Compiled for CPython ${PYTHONS[*]} (the same versions on each) on Linux x86_64 (manylinux_2_28)"
  echo "# from pyproject.toml (+ the dev and export extras) and scripts/lock-constraints.txt by uv pip"
  echo "# compile. Do not edit by hand: re-lock with \`bash scripts/relock.sh\` (see its header). torch is"
  echo "# pinned by version: install.sh installs its CPU build (2.13.0+cpu) where it can be had, else PyPI's."
  pins "$tmp/py${PYTHONS[0]}.lock"
} > "$tmp/new.lock"

# the CUDA build's own packages: PyPI's torch resolved with its real requirements, within the new lock
echo "torch==$torch_pin" > "$tmp/torch.in"
for version in "${PYTHONS[@]}"; do
  compile "$version" "$tmp/cuda$version.lock" "$tmp/torch.in" --constraint "$tmp/new.lock"
  if ! diff <(pins "$tmp/cuda${PYTHONS[0]}.lock") <(pins "$tmp/cuda$version.lock") > "$tmp/diff"; then
    echo "relock.sh: PyPI's torch needs other CUDA packages on Python $version than on ${PYTHONS[0]}:" >&2
    cat "$tmp/diff" >&2; exit 1
  fi
done
{
  echo "# scripts/torch-cuda.lock: the packages PyPI's torch $torch_pin (the CUDA build) adds to requirements.lock;"
  echo "# install.sh constrains it with this file where no CPU build can be had (scripts/torch.sh)."
  echo "# Written by \`bash scripts/relock.sh\`, for CPython ${PYTHONS[*]} on Linux x86_64."
  pins "$tmp/cuda${PYTHONS[0]}.lock" | grep -vxF -f <(pins "$tmp/new.lock")
} > "$tmp/cuda.lock"
mv "$tmp/new.lock" requirements.lock
mv "$tmp/cuda.lock" scripts/torch-cuda.lock
echo "relock.sh: wrote requirements.lock ($(pins requirements.lock | wc -l) packages) and scripts/torch-cuda.lock ($(pins scripts/torch-cuda.lock | wc -l))"
