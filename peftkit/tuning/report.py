"""What a tune writes and says: trials.json and trials.csv (every trial: state, value, parameters,
each epoch, time, error), best.yaml (the best trial's run settings, ready for ``peftkit run
--config``), the plots (``plot_history``: every trial by state; parameter importances), and the
words ``peftkit tune`` and ``bench --tune`` end with (``describe_best``, and ``versus_defaults`` /
``describe_versus_defaults``: whether the best trial beats the defaults beyond validation noise).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import warnings
from typing import TYPE_CHECKING, Any

import yaml

from ..config import RunConfig
from ..files import write_json
from ..stats import from_bits, paired_bootstrap
from .config import TunePlan
from .storage import masked
from .trial import TrialCounts, trial_state

if TYPE_CHECKING:  # pragma: no cover
    import optuna


def versus_defaults(study: optuna.Study) -> dict[str, Any] | None:
    """The best trial against the defaults' (trial 0) on the same validation examples: the
    difference in accuracy points with its 95% interval and p-value (``stats.paired_bootstrap``
    and exact McNemar, as a bench compares strategies), and whether it is more than validation
    noise. None where either trial recorded no per-example validation (a metric other than
    accuracy, a study from before this was recorded, a defaults trial that did not complete) or
    the defaults are the best.

    Why: on a few hundred validation examples one example is a third of a point, and the best of N
    trials is the luckiest of N draws as much as the best configuration; a gain within the noise
    should not be taken for a better configuration."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    defaults = next(
        (
            t
            for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("defaults") and t.user_attrs.get("validation_correct")
        ),
        None,
    )
    if defaults is None or best.user_attrs.get("defaults") or not best.user_attrs.get("validation_correct"):
        return None
    a, b = from_bits(best.user_attrs["validation_correct"]), from_bits(defaults.user_attrs["validation_correct"])
    if len(a) != len(b):
        return None
    c = paired_bootstrap([a], [b])
    return {
        "best_trial": best.number,
        "defaults_trial": defaults.number,
        "examples": c.examples,
        "best": sum(a) / len(a),
        "defaults": sum(b) / len(b),
        "difference": c.difference,
        "low": c.low,
        "high": c.high,
        "bootstrap_p": c.bootstrap_p,
        "mcnemar_p": c.mcnemar_p,
        "p_value": c.p_value,
        "best_only": c.a_only,
        "defaults_only": c.b_only,
        "distinguishable": c.distinguishable(),
    }


def describe_versus_defaults(v: dict[str, Any]) -> str:
    """``+1.8 points [-0.2, +3.9] over the defaults (trial #0) on 1,275 validation examples, p = 0.086:
    within validation noise: not distinguishable from the defaults at 95%`` (or ``...: beyond validation noise``)."""
    verdict = (
        "beyond validation noise"
        if v["distinguishable"]
        else "within validation noise: not distinguishable from the defaults at 95%"
    )
    return (
        f"{100 * v['difference']:+.1f} points [{100 * v['low']:+.1f}, {100 * v['high']:+.1f}] over the defaults "
        f"(trial #{v['defaults_trial']}) on {v['examples']:,} validation examples, p = {v['p_value']:.2g}: {verdict}"
    )


# -- reports ------------------------------------------------------------------------------------


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial as plain data: number, state (``trial_state``), value, parameters, each epoch's
    value, time, error (an interrupted trial's says so, also where a study from before this was
    recorded has none)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        interrupted = bool(t.user_attrs.get("interrupted"))
        rows.append(
            {
                "number": t.number,
                "state": trial_state(t),
                "value": t.value,
                "defaults": bool(t.user_attrs.get("defaults")),
                "params": dict(t.params),
                "epochs": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                "seconds": t.user_attrs.get("seconds"),
                "error": t.user_attrs.get("error") or ("interrupted" if interrupted else None),
                "interrupted": interrupted,
                "validation_correct": t.user_attrs.get("validation_correct"),
            }
        )
    return rows


def defaults_won(study: optuna.Study) -> bool:
    """Whether the study's best trial is the defaults (trial #0, or the defaults queued again after
    it was interrupted): no tuned setting beat them on validation (a tie keeps the earlier trial)."""
    return bool(study.best_trial.user_attrs.get("defaults"))


def describe_best(
    counts: TrialCounts, number: int, metric: str, value: float, params: dict[str, Any], defaults_best: bool
) -> list[str]:
    """The end of a tune in words: ``best: trial #3, validation accuracy 0.8125 (lr=0.0012, r=8); of 6
    trials: 4 complete, 1 pruned, 1 failed``, and where the defaults won, a second line saying so
    (their settings are then no finding of the search, and should not be read as one)."""
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    shown = shown or "no searched setting"
    who = f"trial #{number} (the defaults)" if defaults_best else f"trial #{number}"
    lines = [f"best: {who}, validation {metric} {value:.4f} ({shown}); of {counts.describe()}"]
    if defaults_best:
        lines.append(
            f"the defaults were best: no tuned setting beat them on validation {metric} "
            f"(over {counts.complete} complete trial{'s' if counts.complete != 1 else ''})"
        )
    return lines


def write_reports(
    stage: str, plan: TunePlan, study: optuna.Study, best: RunConfig, best_run: dict[str, Any]
) -> list[str]:
    """best.yaml, trials.json, trials.csv and the plots into ``stage``; returns the plots' names."""
    rows = trial_rows(study)
    counts = TrialCounts.of(study)
    summary = {
        "study_name": plan.study_name,
        "storage": masked(plan.storage),
        **plan.identity,
        "direction": plan.direction,
        "trials": len(rows),
        "counted": counts.finished,
        "counts": {**dataclasses.asdict(counts), "finished": counts.finished, "total": counts.total},
        "best_trial": study.best_trial.number,
        "best_value": study.best_value,
        "best_params": study.best_trial.params,
        "defaults_best": defaults_won(study),
        "versus_defaults": versus_defaults(study),
        "best_run": best_run,
        "rows": rows,
    }
    write_json(os.path.join(stage, "trials.json"), summary)
    _write_csv(os.path.join(stage, "trials.csv"), rows)
    _write_best_yaml(os.path.join(stage, "best.yaml"), plan, study, best)
    return write_plots(study, stage, plan.metric)


def _csv_cell(value: Any) -> Any:
    """A number as a person reads it: six significant digits, so a float32 metric's
    0.7200000286102295 reads 0.72 (trials.json keeps every digit); None as an empty cell."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    params = list(dict.fromkeys(k for r in rows for k in r["params"]))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        # the per-epoch values have their own name: "epochs" is also a searched setting's
        writer.writerow(["number", "state", "value", "defaults", "seconds", "validation_per_epoch", *params, "error"])
        for r in rows:
            epochs = json.dumps({k: float(f"{v:.6g}") for k, v in r["epochs"].items()})
            writer.writerow(
                [
                    _csv_cell(x)
                    for x in (
                        r["number"],
                        r["state"],
                        r["value"],
                        r["defaults"],
                        r["seconds"],
                        epochs,
                        *(r["params"].get(p) for p in params),
                        r["error"],
                    )
                ]
            )


def _write_best_yaml(path: str, plan: TunePlan, study: optuna.Study, best: RunConfig) -> None:
    values = {k: v for k, v in best.to_dict().items() if k not in ("output_dir", "overwrite")}
    header = (
        f"# peftkit tune: trial #{study.best_trial.number}, the best of study {plan.study_name!r} "
        f"({TrialCounts.of(study).describe()}): validation {plan.metric} {study.best_value:.6g}\n"
        + ("# the defaults were best: no tuned setting beat them\n" if defaults_won(study) else "")
        + "# reproduce it: peftkit run --config best.yaml [--output-dir DIR]\n"
    )
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(header)
        yaml.safe_dump(values, fh, sort_keys=False)


# how each kind of trial is drawn in optimization_history.png: (state, marker, colour, legend label)
HISTORY_MARKS = (
    ("complete", "o", "tab:blue", "complete"),
    ("pruned", "x", "tab:orange", "pruned (at its last epoch's value)"),
    ("failed", "v", "tab:red", "failed (at its last epoch's value)"),
    ("interrupted", "s", "tab:gray", "interrupted (at its last epoch's value)"),
)


def history_points(study: optuna.Study) -> dict[str, list[tuple[int, float | None]]]:
    """Each finished or interrupted trial as ``(number, value)`` by state: a complete trial's value,
    or the last epoch's validation a pruned, failed or interrupted one reported (None where it
    reported none: it is drawn on the x axis)."""
    points: dict[str, list[tuple[int, float | None]]] = {state: [] for state, *_ in HISTORY_MARKS}
    for t in study.get_trials(deepcopy=False):
        state = trial_state(t)
        if state not in points:  # running or waiting: no result yet
            continue
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        points[state].append((t.number, t.value if state == "complete" else last))
    return points


def plot_history(study: optuna.Study, metric: str) -> Any:
    """The study's optimisation history as a matplotlib figure: every trial by number, each state
    marked differently with a legend, and the best complete value so far as a line. Optuna's own
    plot draws complete trials only, which hides how many trials the pruner and failures cost."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    points = history_points(study)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    complete = sorted(points["complete"])
    if complete:  # the best so far, as a step line under the points
        pick = max if study.direction.name == "MAXIMIZE" else min
        best = [pick(v for _, v in complete[: i + 1]) for i in range(len(complete))]
        ax.step([n for n, _ in complete], best, where="post", color="tab:green", label="best so far")
    handles = []
    for state, marker, colour, label in HISTORY_MARKS:
        valued = [(n, v) for n, v in points[state] if v is not None]
        if valued:
            ax.scatter([n for n, _ in valued], [v for _, v in valued], marker=marker, color=colour, label=label)
        bare = [n for n, v in points[state] if v is None]
        if bare:  # no value to place it by: on the x axis, in axes coordinates, so it is seen
            ax.scatter(
                bare,
                [0.0] * len(bare),
                marker=marker,
                color=colour,
                clip_on=False,
                zorder=3,
                transform=ax.get_xaxis_transform(),
            )
            handles.append(
                Line2D(
                    [], [], linestyle="", marker=marker, color=colour, label=f"{state} (no validation: on the x axis)"
                )
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers: no trial 2.5
    ax.set_xlabel("trial #")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"Optimisation history: {TrialCounts.of(study).describe()}")
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, fontsize="small")
    return fig


def write_plots(study: optuna.Study, stage: str, metric: str = "value") -> list[str]:
    """optimization_history.png (every trial, ``plot_history``), and param_importances.png when at
    least two parameters vary over at least three complete trials (importance needs some spread to
    mean anything)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none assumed
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    written = []
    figures = [("optimization_history.png", lambda: plot_history(study, metric))]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len({k for t in complete for k in t.params}) >= 2 and len(complete) >= 3:
        figures.append(("param_importances.png", lambda: _figure(ovm.plot_param_importances(study))))
    for name, make in figures:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's ExperimentalWarning for its matplotlib plots
            try:
                fig = make()
            except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. every value equal: no importance
                continue
        fig.tight_layout()
        fig.savefig(os.path.join(stage, name), dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _figure(ax: Any) -> Any:
    """The figure of what an optuna matplotlib plot returns (an axes, or an array of them)."""
    return ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
