"""Is `peftkit recommend`'s answer as good as a much longer tuned bench's? (issue 35's target)

Compares, on the same test examples (same seeds, so the same splits and test caps), the recommended
strategy's runs with the best strategy of a reference `peftkit bench --tune N --seeds ...` made on the
same subset, and with `lora` at its defaults in that reference: the paired test the bench itself
uses (bootstrap over test examples, stratified by seed, and exact McNemar). Also the two commands'
wall times.

    .venv/bin/python benchmarks/recommend_vs_reference.py runs/recommend-cpu \\
        benchmarks/results/bench_cpu_tune --out benchmarks/results/recommend_cpu/vs_reference

The reference must have been run with the same model, data, --max-train-samples, --max-eval-samples
and seeds (checked). It may be several benches of the same settings, each over some of the
strategies (a tuned bench of all of them takes hours on a CPU: it can be run in parts): their union
is the reference, its best the strategy whose tuned configuration has the highest mean (each of
them where several tie), and its time the sum of theirs.

    .venv/bin/python benchmarks/recommend_vs_reference.py runs/recommend-cpu \
        benchmarks/results/bench_cpu_tune benchmarks/results/bench_cpu_tune_more --out ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from peftkit.benchmark.summary import against_best, correct_by_seed  # noqa: E402


def rows_of(results: dict, strategy: str, configuration: str | None = None) -> list[dict]:
    """The ok rows of ``strategy`` (of a bench --tune's ``configuration``: default or tuned)."""
    return [
        r
        for r in results["rows"]
        if r["strategy"] == strategy
        and r.get("status") == "ok"
        and (configuration is None or r.get("configuration") == configuration)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recommend_dir")
    ap.add_argument("reference_dir", nargs="+", help="one bench --tune's output directory, or several (their union)")
    ap.add_argument("--out", required=True, help="path without extension: .json and .md are written")
    ap.add_argument(
        "--reference-seconds",
        type=float,
        help="the reference's whole time, where its results.json holds less: a bench whose studies were "
        "continued from --tune-storage records only its last call's tuning time",
    )
    args = ap.parse_args()
    with open(os.path.join(args.recommend_dir, "results.json")) as fh:
        rec = json.load(fh)
    refs = []
    for directory in args.reference_dir:
        with open(os.path.join(directory, "results.json")) as fh:
            refs.append(json.load(fh))
    for ref in refs:
        for key in ("model", "dataset", "max_train_samples", "max_eval_samples", "seeds"):
            if rec["settings"].get(key) != ref["settings"].get(key):
                sys.exit(
                    f"{key} differs: recommend {rec['settings'].get(key)!r}, reference {ref['settings'].get(key)!r}"
                )
    key = rec["quality"][0]
    # the union's best: the highest mean of a tuned configuration (each bench's summary is its tuned one)
    means = {
        name: (s[f"{key}_mean"], ref)
        for ref in refs
        for name, s in ref["summary"].items()
        if s.get(f"{key}_mean") is not None
    }
    # strategies tied at the top (equal means over the same test examples happen: 238 of 300 right
    # on each seed is the same mean whichever strategy got them) are each the best: compared with all
    top = max(mean for mean, _ref in means.values())
    bests = [name for name, (mean, _ref) in means.items() if abs(mean - top) < 1e-9]
    tie = " (tied)" if len(bests) > 1 else ""
    lora_ref = next(ref for ref in refs if rows_of(ref, "lora", "default"))
    chosen = rec["recommendation"]["strategy"]
    mine = correct_by_seed(rows_of(rec, chosen), key)[chosen]
    versus = {
        f"reference best{tie}: {best} (tuned)": correct_by_seed(rows_of(means[best][1], best, "tuned"), key)[best]
        for best in bests
    }
    versus["reference: lora (defaults)"] = correct_by_seed(rows_of(lora_ref, "lora", "default"), key)["lora"]
    compared = {name: against_best(theirs, mine) for name, theirs in versus.items()}
    out = {
        "command": " ".join(["benchmarks/recommend_vs_reference.py", *sys.argv[1:]]),
        "recommended": chosen,
        "recommend_command": rec["command"],
        "recommend_seconds": rec["search"]["seconds"],
        "reference_command": " ; ".join(ref["command"] for ref in refs),
        "reference_strategies": sorted({name for ref in refs for name in ref["summary"]}),
        "reference_best": bests,
        "reference_seconds": args.reference_seconds
        or sum(ref["suite_seconds"] + (ref.get("tuning") or {}).get("seconds", 0.0) for ref in refs),
        "versions_recommend": rec["versions"],
        "versions_reference": [ref["versions"] for ref in refs],
        "comparisons": compared,
        "note": "difference: the recommended strategy's accuracy minus the reference's, on the same test examples",
    }
    out["time_fraction"] = out["recommend_seconds"] / out["reference_seconds"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(out, fh, indent=2)
    lines = [
        "# `peftkit recommend` against a tuned bench on the same subset",
        "",
        f"- Recommend: `{out['recommend_command']}`: **{chosen}**, {out['recommend_seconds'] / 60:.1f} min",
        f"- Reference ({', '.join(out['reference_strategies'])}): `{out['reference_command']}`: "
        f"{out['reference_seconds'] / 60:.1f} min; recommend took {100 * out['time_fraction']:.0f}% of its time",
        "",
        "| against | difference (recommended - reference) | 95% CI | p | verdict | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in compared.items():
        if "difference" not in c:
            lines.append(f"| {name} | - | - | - | {c['verdict']} | - |")
            continue
        lines.append(
            f"| {name} | {100 * c['difference']:+.1f} points | [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}] "
            f"| {c['p_value']:.2g} | {c['verdict']} | {', '.join(map(str, c['seeds']))} |"
        )
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
