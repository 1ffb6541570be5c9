# Sourced by install.sh and scripts/test-latest.sh: which build of torch to install, and installing it.
#
# requirements.lock pins torch's *version* (2.13.0); the *build* is a choice of the machine:
#   - the CPU build (2.13.0+cpu, ~200 MB) wherever it can be had: pip's own find-links and indexes
#     (on this project's machines /opt/wheels holds it for CPython 3.11), else PyTorch's CPU index
#     (https://download.pytorch.org/whl/cpu) when it answers;
#   - otherwise PyPI's plain build, which on Linux x86_64 is the CUDA 13 build (~3 GB with its
#     nvidia-* packages, pinned by scripts/torch-cuda.lock): it runs on a CPU too.
# PEFTKIT_TORCH chooses instead of guessing: "cpu" (the CPU build or fail), "pypi" (PyPI's build: what
# a CUDA user wants; add PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu126 for another CUDA),
# "auto" (the default: as above).

TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# locked_torch LOCK: the torch version the lock pins ("2.13.0")
locked_torch() {
  sed -nE 's/^torch==([^ ;+]+).*/\1/p' "$1"
}

# install_torch PYTHON VERSION NAME: install torch VERSION into PYTHON's environment (NAME prefixes
# the one line that says which build was chosen). Nothing is done when that version is installed.
install_torch() {
  local py=$1 want=$2 me=$3 have req="" why index=""
  local args=(-c requirements.lock)
  have=$("$py" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
  if [ "${have%%+*}" = "$want" ]; then return 0; fi
  local choice=${PEFTKIT_TORCH:-auto}
  case "$choice" in auto|cpu|pypi) ;; *)
    echo "$me: PEFTKIT_TORCH='$choice' is not a torch build; accepted: auto, cpu, pypi" >&2; return 2 ;;
  esac
  if [ "$choice" != pypi ]; then
    if "$py" -m pip install --disable-pip-version-check -q --dry-run --no-deps --only-binary=:all: \
        "torch==$want+cpu" >/dev/null 2>&1; then
      req="torch==$want+cpu"
    elif "$py" -c "import urllib.request as u; u.urlopen('$TORCH_CPU_INDEX/torch/', timeout=10)" >/dev/null 2>&1; then
      req="torch==$want+cpu"; index=$TORCH_CPU_INDEX; args+=(--extra-index-url "$index")
    elif [ "$choice" = cpu ]; then
      echo "$me: PEFTKIT_TORCH=cpu, but no CPU build of torch $want for $("$py" -V) is in pip's find-links or indexes and $TORCH_CPU_INDEX does not answer" >&2
      return 1
    fi
  fi
  if [ -z "$req" ]; then
    req="torch==$want"; args+=(-c scripts/torch-cuda.lock)
    why="no CPU build of torch $want for $("$py" -V) in pip's find-links or indexes, and $TORCH_CPU_INDEX does not answer"
    [ "$choice" = pypi ] && why="PEFTKIT_TORCH=pypi"
    echo "$me: $why: installing PyPI's torch $want (on Linux x86_64 the CUDA build, about 3 GB; it runs on a CPU too)" >&2
  else
    echo "$me: torch $want, the CPU build${index:+ (from $index)}" >&2
  fi
  "$py" -m pip --disable-pip-version-check -q install "${args[@]}" "$req" \
    2> >(grep -v "is ignored: it is neither" >&2)
}
