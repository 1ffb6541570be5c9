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
# on the device machine the scratch (a 2.4 GB model, run directories) stays out of $OUT, which is
# sent back, and in /tmp, which part 2 finds again on the machine part 1 warmed (the model is reused)
[ -n "${OUT:-}" ] && ! printf '%s\n' "$@" | grep -qx -- '--work' && args+=(--work /tmp/gpu-suite-work)
if [ "$dry" = 0 ]; then
  start=$(date +%s)
  SITE=/tmp/peftkit-site
  # part 2 comes to the machine part 1 warmed: what it installed is still there, and installing it
  # again cost ~40 s of a 15-minute device budget (second H200 session). Reinstalled when the
  # carried wheels or peftkit's sources differ from what was installed.
  stamp=$( (ls -l .gpu_carry/wheels 2>/dev/null; find peftkit plugins/peftkit-bitfit/peftkit_bitfit pyproject.toml plugins/peftkit-bitfit/pyproject.toml -type f \
    \( -name '*.py' -o -name '*.toml' \) -print0 | sort -z | xargs -0 md5sum) | md5sum | cut -d' ' -f1)
  if [ -f "$SITE/.peftkit-stamp" ] && [ "$(cat "$SITE/.peftkit-stamp")" = "$stamp" ]; then
    echo "run.sh: $SITE is as the last call left it; not installing again" >&2
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
  rm -rf "$SITE" && mkdir -p "$SITE"
  if [ -d .gpu_carry/wheels ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .gpu_carry/wheels/*.whl || echo "run.sh: installing the carried wheels failed; using the image's" >&2
  fi
  # peftkit and the bitfit plugin, as distributions (their versions and entry point are then found)
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" \
    . plugins/peftkit-bitfit >/dev/null 2>&1 || echo "run.sh: installing peftkit failed; running from the tree" >&2
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # a carried library that does not import with the image's own packages is dropped for the image's
  # (liger-kernel: what peftkit imports of it; without it, --kernels liger is refused in one line)
  for spec in transformers peft datasets bitsandbytes liger_kernel:liger_kernel.transformers.monkey_patch; do
    mod=${spec%%:*}; imp=${spec#*:}
    if ! err=$("$PY" -c "import $imp" 2>&1); then
      echo "run.sh: carried $mod does not import here (${err##*$'\n'}); using the image's" >&2
      rm -rf "$SITE/$mod" "$SITE/$mod"-*.dist-info
    fi
  done
  echo "$stamp" > "$SITE/.peftkit-stamp"
  fi
  [ -d .gpu_carry/tokenizer ] && args+=(--tokenizer .gpu_carry/tokenizer)
  [ -f .gpu_carry/rotten_tomatoes.csv ] && args+=(--data .gpu_carry/rotten_tomatoes.csv)
  [ -f .gpu_carry/rotten_tomatoes_corpus_full.csv.bz2 ] && args+=(--corpus .gpu_carry/rotten_tomatoes_corpus_full.csv.bz2)
  echo "run.sh: set-up took $(( $(date +%s) - start )) s" >&2
fi
exec "$PY" benchmarks/gpu/suite.py "${args[@]}"
