"""Step time of peftkit against Transformers' Trainer + peft, PAIRED: each side in a process of its
own, the two taking turns step by step, so the ratio does not move with the machine's speed.

``vs_trainer.py`` runs each side in a fresh process and compares the medians of a few steps. That is
the right way to measure memory, but on a shared machine whose speed drifts by 20-40% within minutes
(the Trainer's own steps of job a ranged 24.5-35.1 s inside one process) a step-time ratio of two
processes run minutes apart resolves nothing finer than about +-15%. Here both processes run at once
and hand the machine to each other through two named pipes, so every Trainer step is followed at once
by a peftkit step and both see the same machine, while neither waits on the other's clock:

* the Trainer side is ``vs_trainer.py``'s own (``trainer_side``: ``from_pretrained``,
  ``get_peft_model``, ``Trainer(...).train()``), training the job's full batch for ``--pairs`` steps;
  its step is timed from ``on_step_begin`` to ``on_step_end`` as there. Its process is a plain
  Python process, as a user's script is: it never runs peftkit's process-wide settings;
* the peftkit side is ``peftkit run`` on the same job (the same flags as ``vs_trainer.py``'s peftkit
  row, one epoch): its first call of ``loop.train_step`` is caught with its arguments (the model,
  optimizer, strategy, loss and batch peftkit built), and that step runs once after each Trainer
  step, timed the same way (forward, loss, backward, clipping, optimizer step; the loss read back,
  as peftkit's loop reads it); then the run goes on as usual.

Why two processes: peftkit's command line sets process-wide things a Trainer script does not have
(the garbage collector's frozen imports; until 2026-12-08, glibc returning every freed block of 4 MiB
or more to the system at once, which costs page faults on the next step). In one process the
Trainer's steps ran under peftkit's settings, so the ratio left out what they cost peftkit: job a's
0.829 in one process was 1.268 in two, when every CPU run returned those blocks (benchmarks/README.md).
The partner process has a cost of its own on a virtual machine whose balloon reports free pages to
its host: memory a side returns to the system comes back dearer while the other side holds its own
(``refault.py``), so a lean run's (``--memory-budget``) cost here is an upper bound.

Each pair gives a ratio peftkit / Trainer. The first pair is warm-up and left out; the report gives the
geometric mean of the other pairs' ratios with its 95% interval (t over the logs of the ratios: the
pairs are the replicates), each side's median step, and the two sides' first-step losses: both start
from the same weights on the same batch, so for a and b they must agree to float noise (as in
``vs_trainer.py``; job c's MiniLM keeps its own dropout, which draws other masks). peftkit's later steps
repeat its first step's learning rate, which changes no step's cost.

What this does not measure: memory (both processes are resident at once: ``vs_trainer.py``'s fresh
processes measure it), start-up and data loading. Jobs a, b and c of ``vs_trainer.py`` (job p trains
different batches on each side).

    .venv/bin/python benchmarks/vs_trainer_paired.py            # a, b, c: results/vs_trainer_paired_<device>.json
    .venv/bin/python benchmarks/vs_trainer_paired.py --jobs c --pairs 40
    .venv/bin/python benchmarks/vs_trainer_paired.py --smoke    # 3 pairs, length 64, batch 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import vs_trainer as vt  # noqa: E402  (beside this file)

# pairs per job by default: about 5 minutes of a 2-core CPU each (a step of a takes ~25 s, b ~13 s,
# c ~0.7 s there; c's steps are short enough for many pairs, and short steps drift the most)
PAIRS = {"a": 6, "b": 10, "c": 40}
JOBS = tuple(PAIRS)


# == the children: one side each, taking turns ===================================================


class Turns:
    """Whose turn it is, between the two children: two named pipes (the parent made them), each side
    reading its own and writing the other's, one byte a turn."""

    def __init__(self, mine: str, theirs: str, timeout: float | None) -> None:
        # O_RDWR: opening a pipe then never waits for the other end to be opened (Linux)
        self.mine = os.open(mine, os.O_RDWR)
        self.theirs = os.open(theirs, os.O_RDWR)
        self.timeout = timeout

    def wait(self) -> None:
        """Until the other side hands the machine over (or ``timeout`` seconds: it is gone)."""
        ready, _, _ = select.select([self.mine], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"the other side did not hand over within {self.timeout:.0f} s")
        os.read(self.mine, 1)

    def give(self) -> None:
        os.write(self.theirs, b"t")


def trainer_paired(spec: dict[str, Any], turns: Turns) -> dict[str, Any]:
    """The Trainer side, ``vs_trainer.py``'s own, for ``spec['steps']`` steps: each one starts once
    peftkit's process is ready (the first) or has taken its step (the others)."""
    probe = vt.Probe(spec["device"] == "cuda", interval=1.0)  # memory is not measured: a sample a second
    began: list[bool] = []

    def before() -> None:
        if not began:  # peftkit's process has loaded its model and built its first batch
            turns.wait()
            began.append(True)

    def after() -> None:
        turns.give()  # peftkit's step now, while this process waits
        turns.wait()

    out = vt.trainer_side(spec, probe, after_step=after, before_step=before)
    return {**out, **probe.figures()}


def peftkit_paired(spec: dict[str, Any], turns: Turns) -> dict[str, Any]:
    """``peftkit run`` through its command line's ``main``: its first call of ``loop.train_step`` is
    caught with its arguments, and that step runs ``spec['pairs']`` times, each when the Trainer's
    process has taken a step; then the run goes on as usual."""
    from peftkit import env, loop

    probe = vt.Probe(spec["device"] == "cuda", interval=1.0)
    module = sys.modules[loop.Trainer.__module__]  # where the loop looks train_step up
    original = module.train_step
    held: dict[str, Any] = {}

    def first_step(*args: Any, **kwargs: Any) -> Any:
        if not held:
            held["own_process"] = bool(getattr(env, "_own_process", False))
            probe.saw_batch(kwargs.get("batch", args[5] if len(args) > 5 else None))
            turns.give()  # ready: the Trainer's first step
            for _ in range(spec["pairs"]):
                turns.wait()
                probe.step_start()
                loss = original(*args, **kwargs)
                value = float(loss.detach().float())  # peftkit's loop reads the loss back too
                probe.step_end()
                probe.losses.append(value)
                turns.give()
        return original(*args, **kwargs)

    module.train_step = first_step
    from peftkit.cli import main

    try:
        main(spec["peftkit_args"])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        module.train_step = original
    if code != 0:
        return {"status": "failed", "exit_code": code, "error": f"peftkit run exited with status {code}"}
    if not held:
        return {"status": "failed", "error": "peftkit's run took no training step"}
    return {"status": "ok", "own_process": held["own_process"], **probe.figures()}


def child_main(spec_path: str) -> None:
    """One side of one pair in this (fresh) process: write its figures to ``spec['result']``."""
    import traceback

    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    turns = Turns(spec["turns"][0], spec["turns"][1], spec.get("turn_timeout"))
    try:
        out = (trainer_paired if spec["side"] == "trainer" else peftkit_paired)(spec, turns)
    except Exception as exc:  # the row's one line; the traceback stays in the child's stderr
        traceback.print_exc()
        out = {"status": "failed", "error": vt.one_line(exc)}
    out.update(threads=torch.get_num_threads(), pid=os.getpid())
    with open(spec["result"], "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if out["status"] == "ok" else 1)  # no interpreter teardown: the figures are written


def run_pair(
    specs: dict[str, dict[str, Any]], timeout: float | None, echo: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both children at once (``specs``: trainer, peftkit), each in a fresh process; when one fails
    the other is stopped (it would wait for its turn in vain). Their results."""
    started = time.perf_counter()
    procs = {side: vt.start_child(spec, script=__file__) for side, spec in specs.items()}
    codes: dict[str, int | None] = {}
    while len(codes) < len(procs):
        for side, (proc, _) in procs.items():
            if side not in codes and proc.poll() is not None:
                codes[side] = proc.returncode
        failed = any(c != 0 for c in codes.values())
        late = timeout is not None and time.perf_counter() - started > timeout
        if (failed or late) and len(codes) < len(procs):
            for side, (proc, _) in procs.items():
                if side not in codes:
                    proc.kill()
                    proc.wait()
                    codes[side] = None if late else -9
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    trainer, peftkit = (
        vt.child_result(specs[side], codes[side], seconds, procs[side][1], timeout, echo)
        for side in ("trainer", "peftkit")
    )
    return trainer, peftkit


def paired_run(trainer: dict[str, Any], peftkit: dict[str, Any]) -> dict[str, Any]:
    """One pair of children's figures as one run: both sides' steps, losses, data and processes."""
    if peftkit.get("status") != "ok" or trainer.get("status") != "ok":
        bad = peftkit if peftkit.get("status") != "ok" else trainer
        return {
            "status": bad.get("status", "failed"),
            "error": bad.get("error", "?"),
            "wall_seconds": max(trainer.get("wall_seconds", 0), peftkit.get("wall_seconds", 0)),
        }
    return {
        "status": "ok",
        "trainer_steps": trainer["step_seconds"],
        "peftkit_steps": peftkit["step_seconds"],
        "trainer_losses": trainer["step_losses"],
        "peftkit_losses": peftkit["step_losses"],
        "trainer_digest": trainer["data_digest"],
        "peftkit_digest": peftkit["data_digest"],
        "trainer_spans": trainer.get("step_spans"),
        "peftkit_spans": peftkit.get("step_spans"),
        "pids": {"trainer": trainer.get("pid"), "peftkit": peftkit.get("pid")},
        "peftkit_own_process": peftkit.get("own_process"),
        "tokens_per_step": (trainer["tokens_per_step"] or [None])[0],
        "trainer_optimizer_steps": trainer.get("optimizer_steps"),
        "threads": peftkit.get("threads"),
        "wall_seconds": max(trainer["wall_seconds"], peftkit["wall_seconds"]),
    }


# == the parent ===================================================================================


def paired_ratio(trainer: list[float], peftkit: list[float]) -> dict[str, Any]:
    """peftkit / Trainer over the pairs given (warm-up pairs already left out): the geometric mean
    of the per-pair ratios and its 95% interval (t over their logs), and each side's median step."""
    from peftkit.stats import mean_interval

    pairs = list(zip(trainer, peftkit))
    logs = [math.log(p / t) for t, p in pairs if t > 0 and p > 0]
    if not logs:
        return {"pairs": 0}
    interval = mean_interval(logs)
    return {
        "pairs": len(logs),
        "ratio": math.exp(statistics.fmean(logs)),
        "ratio_ci95": [math.exp(interval[0]), math.exp(interval[1])] if interval else None,
        "ratio_min": math.exp(min(logs)),
        "ratio_max": math.exp(max(logs)),
        "trainer_step_median": statistics.median(t for t, _ in pairs),
        "peftkit_step_median": statistics.median(p for _, p in pairs),
    }


def first_losses(result: dict[str, Any], job: vt.Job, precision: str) -> dict[str, Any]:
    """Both sides' first-step losses (the same weights, the same batch) and whether they agree."""
    t, p = ((result.get(k) or [None])[0] for k in ("trainer_losses", "peftkit_losses"))
    same = result.get("trainer_digest") == result.get("peftkit_digest")
    out: dict[str, Any] = {"trainer": t, "peftkit": p, "same_data": same}
    if t is None or p is None:
        out["verdict"] = "missing"
    elif job.shape == "labelled":
        out["verdict"] = "not compared (dropout)"
    else:
        out["rel_diff"] = abs(p - t) / max(abs(t), 1e-12)
        out["verdict"] = "agree" if out["rel_diff"] <= vt.TOLERANCE[precision][0] else "DIFFER"
    return out


def run_job(
    plan: dict[str, Any],
    *,
    pairs: int,
    repeats: int,
    precision: str,
    device: str,
    threads: int | None,
    workdir: str,
    timeout: float | None,
    variants: list[tuple[str, list[str]]],
    echo: Any,
) -> dict[str, Any]:
    """Each peftkit row of one job paired with the Trainer, ``repeats`` fresh processes each."""
    job: vt.Job = plan["job"]
    rows = []
    for label, flags in variants:
        row: dict[str, Any] = {"label": label, "flags": list(flags), "runs": []}
        rows.append(row)
        why = vt.unavailable(list(flags))
        if why is not None:
            row.update(status="not available", error=why)
            echo(f"[{job.key}] {label}: not available in this peftkit ({why})")
            continue
        for i in range(repeats):
            tag = vt.variant_tag(list(flags))
            base = os.path.join(workdir, f"{job.key}-{tag}-{i}")
            common = {"precision": precision, "device": device, "threads": threads}
            os.makedirs(base, exist_ok=True)
            pipes = {side: os.path.join(base, f"turn-{side}") for side in ("trainer", "peftkit")}
            for path in pipes.values():
                os.mkfifo(path)
            specs = {
                # peftkit trains one epoch: its first step is where the pairs run
                "peftkit": vt.side_spec(
                    plan, "peftkit", list(flags), steps=1, workdir=os.path.join(base, "peftkit"), **common
                ),
                "trainer": vt.side_spec(
                    plan, "trainer", [], steps=pairs, workdir=os.path.join(base, "trainer"), **common
                ),
            }
            for side, spec in specs.items():
                other = "trainer" if side == "peftkit" else "peftkit"
                spec.update(pairs=pairs, turns=[pipes[side], pipes[other]], turn_timeout=timeout)
            echo(f"[{job.key}] {label} paired with {vt.TRAINER} ({pairs} pairs, run {i + 1}/{repeats}) ...")
            result = paired_run(*run_pair(specs, timeout, echo))
            row["runs"].append(result)
            if result.get("status") != "ok":
                row.update(status=result.get("status", "failed"), error=result.get("error", "?"))
                echo(f"[{job.key}] {label}: {row['status']}: {row['error']}")
                break
            r = paired_ratio(result["trainer_steps"][1:], result["peftkit_steps"][1:])
            echo(
                f"[{job.key}] {label}: {result['wall_seconds']:.0f} s, peftkit/Trainer step "
                f"{vt._f(r.get('ratio'), '.3f')} over {r['pairs']} pairs"
            )
        if row.get("status"):
            continue
        runs = row["runs"]
        row["status"] = "ok"
        # every run's warm-up pair is left out, then the runs' pairs are pooled
        row["summary"] = paired_ratio(
            [s for r in runs for s in r["trainer_steps"][1:]], [s for r in runs for s in r["peftkit_steps"][1:]]
        )
        row["first_losses"] = first_losses(runs[0], job, precision)
        row["tokens_per_step"] = runs[0].get("tokens_per_step")
    return {
        "settings": {
            "job": job.key,
            "title": job.title,
            "model": plan["model"],
            "model_dir": plan["model_dir"],
            "dataset": plan["dataset"],
            "batch_size": plan["batch_size"],
            "max_length": plan["max_length"],
            "pairs": pairs,
            "repeats": repeats,
            "precision": precision,
            "device": device,
            "threads": next((r["runs"][0].get("threads") for r in rows if r.get("runs")), threads),
            **vt.lora_settings(),
        },
        "rows": rows,
    }


def format_job(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"## {s['job']}: {s['title']} ({s['model']}, batch {s['batch_size']} x {s['max_length']} tokens, "
        f"{s['precision']}, {s['threads']} threads; paired with {vt.TRAINER}, taking turns in two processes)",
        "",
        "| peftkit row | pairs | Trainer step (median, s) | peftkit step (median, s) | peftkit / Trainer "
        "(geometric mean, 95% interval) | range | first-step losses (Trainer / peftkit) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if row["status"] != "ok":
            word = "not available in this peftkit" if row["status"] == "not available" else "failed"
            lines.append(f"| {row['label']} | {word}: {row.get('error', '?')} | | | | | |")
            continue
        m, f = row["summary"], row["first_losses"]
        ci = m.get("ratio_ci95")
        losses = f"{vt._f(f['trainer'], '.5f')} / {vt._f(f['peftkit'], '.5f')}: {f['verdict']}" + (
            f" ({f['rel_diff']:.1e})" if "rel_diff" in f else ""
        )
        if not f["same_data"]:
            losses += "; NOT the same examples"
        lines.append(
            f"| {row['label']} | {m['pairs']} | {vt._f(m.get('trainer_step_median'), '.3f')} | "
            f"{vt._f(m.get('peftkit_step_median'), '.3f')} | **{vt._f(m.get('ratio'), '.3f')}**"
            + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            + f" | {vt._f(m.get('ratio_min'), '.2f')}-{vt._f(m.get('ratio_max'), '.2f')} | {losses} |"
        )
    return "\n".join(lines)


def key_ratios(results: dict[str, dict[str, Any]]) -> str:
    """The last line: per job, peftkit's default row's paired step-time ratio and its interval."""
    parts = []
    for key, res in results.items():
        row = next((r for r in res.get("rows", []) if not r.get("flags")), None)
        if row is None or row.get("status") != "ok":
            parts.append(f"{key}: {row.get('status') if row else 'no peftkit row'}")
            continue
        m = row["summary"]
        ci = m.get("ratio_ci95")
        parts.append(
            f"{key}: step_time={vt._f(m.get('ratio'), '.3f')}"
            + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            + f" losses={row['first_losses']['verdict']}"
        )
    return "peftkit/Trainer (paired) " + "; ".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"which jobs, comma-separated ({', '.join(JOBS)})")
    ap.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="Trainer steps, each followed by a peftkit step; the first pair is warm-up "
        f"(default: {', '.join(f'{k} {v}' for k, v in PAIRS.items())}; --smoke: 3)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="fresh processes per row (their pairs pooled)")
    ap.add_argument("--model", default=None, help="causal LM for jobs a and b (short name or directory)")
    ap.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the job's)")
    ap.add_argument("--batch-size", type=int, default=None, help="the full batch (default: the job's)")
    ap.add_argument(
        "--variants",
        default="default",
        help="peftkit rows, comma-separated tags as in vs_trainer.py (default, loss-plain, kernels-none, "
        "packing) or all; default: default",
    )
    ap.add_argument("--smoke", action="store_true", help="a quick check: 3 pairs, length 64, batch 2")
    ap.add_argument(
        "--out", default=None, help="result file (default: results/vs_trainer_paired_<device>[_smoke].json; '' none)"
    )
    vt.common_arguments(ap)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    keys = [k.strip() for k in args.jobs.split(",") if k.strip()]
    bad = [k for k in keys if k not in PAIRS]
    if bad or not keys:
        ap.error(f"--jobs: unknown job(s) {', '.join(bad) or '(none)'}; choose from {', '.join(JOBS)}")
    for name, least in (("pairs", 2), ("repeats", 1), ("max_length", 1), ("batch_size", 1), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < least:  # pairs: the first is warm-up, so at least one more
            ap.error(f"--{name.replace('_', '-')} must be at least {least}")
    wanted = vt.wanted_variants(ap, args.variants, list(JOBS))
    device = vt.pick_device(ap, args.device)
    if args.out is None:
        args.out = os.path.join(HERE, "results", f"vs_trainer_paired_{device}{'_smoke' if args.smoke else ''}.json")
    from peftkit.env import quiet_libraries

    quiet_libraries()

    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()

    def write() -> None:
        if not args.out:
            return
        record = {
            **vt.record_head("vs_trainer_paired.py", argv, device, started),
            "jobs": results,
            "summary": key_ratios(results),
            "complete": len(results) == len(keys),
        }
        vt.write_record(args.out, record)

    work = tempfile.mkdtemp(prefix="vs-trainer-paired-")
    try:
        corpus = vt.read_corpus(args.corpus) if args.corpus else None
        for key in keys:
            job = vt.JOBS[key]
            batch = args.batch_size or (2 if args.smoke else job.batch_size)
            length = args.max_length or (64 if args.smoke else job.max_length)
            echo(f"[{key}] {job.title}: preparing the data (batch {batch}, length {length}) ...")
            try:
                plan = vt.prepare_job(
                    job,
                    work,
                    model=args.model,
                    batch_size=batch,
                    max_length=length,
                    eval_examples=min(job.eval_examples, 4) if args.smoke else None,
                    corpus=corpus,
                )
            except Exception as exc:  # a missing corpus or model: this job's line, not a traceback
                results[key] = {"settings": {"job": key, "title": job.title}, "error": vt.one_line(exc), "rows": []}
                echo(f"[{key}] failed: {vt.one_line(exc)}")
                write()
                continue
            variants = [v for v in vt.VARIANTS[key] if wanted is None or vt.variant_tag(v[1]) in wanted]
            results[key] = run_job(
                plan,
                pairs=args.pairs or (3 if args.smoke else PAIRS[key]),
                repeats=args.repeats,
                precision=args.precision,
                device=device,
                threads=args.threads,
                workdir=work,
                timeout=args.timeout,
                variants=variants,
                echo=echo,
            )
            print(format_job(results[key]) + "\n", flush=True)
            write()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(key_ratios(results), flush=True)


if __name__ == "__main__":
    main()
