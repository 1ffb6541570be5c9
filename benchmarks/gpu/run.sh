#!/usr/bin/env bash
# The GPU suite, one command (see benchmarks/gpu/README.md):
#   bash benchmarks/gpu/run.sh [--dry-run] [--out DIR] [suite.py options]
# On a GPU machine with no network it first installs what travelled in .gpu_carry/ (made by
# prepare.sh): the wheels, peftkit itself and the bitfit plugin, into /tmp/peftkit-site. Then it runs
# suite.py, which writes results.json, results.md, logs/ and bench/ into --out (default: $OUT/gpu
# on the device machine, else runs/gpu-suite). --dry-run: a tiny model on the CPU, installs nothing.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python  # a development machine
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
out_default=${OUT:+$OUT/gpu}
args=("$@")
printf '%s\n' "$@" | grep -qx -- '--out' || args+=(--out "${out_default:-runs/gpu-suite}")
if [ "$dry" = 0 ]; then
  start=$(date +%s)
  SITE=/tmp/peftkit-site
  if [ -d .gpu_carry/wheels ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .gpu_carry/wheels/*.whl || echo "run.sh: installing the carried wheels failed; using the image's" >&2
  fi
  # peftkit and the bitfit plugin, as distributions (their versions and entry point are then found)
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" \
    . plugins/peftkit-bitfit >/dev/null 2>&1 || echo "run.sh: installing peftkit failed; running from the tree" >&2
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # a carried library that does not import with the image's own packages is dropped for the image's
  for mod in transformers peft datasets bitsandbytes; do
    if ! err=$("$PY" -c "import $mod" 2>&1); then
      echo "run.sh: carried $mod does not import here (${err##*$'\n'}); using the image's" >&2
      rm -rf "$SITE/$mod" "$SITE/$mod"-*.dist-info
    fi
  done
  [ -d .gpu_carry/tokenizer ] && args+=(--tokenizer .gpu_carry/tokenizer)
  [ -f .gpu_carry/rotten_tomatoes.csv ] && args+=(--data .gpu_carry/rotten_tomatoes.csv)
  echo "run.sh: set-up took $(( $(date +%s) - start )) s" >&2
fi
exec "$PY" benchmarks/gpu/suite.py "${args[@]}"
