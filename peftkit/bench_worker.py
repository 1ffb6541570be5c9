"""One benchmark run in its own process: ``python -m peftkit.bench_worker SPEC.json``.

Started by ``peftkit bench`` (``peftkit.benchmark.spawn_worker``), never by users. It runs one
``RunConfig`` into its run directory and writes a small JSON report: ``ok`` with the run's
metrics, ``oom`` when the run ran out of memory (CUDA) or over its budget (CPU), so the suite can
halve the micro-batch and try again, or ``failed`` with a one-line error (the traceback, if any, goes
to the log file the spec names).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any


def main(spec_path: str) -> int:
    """Run the spec's ``RunConfig`` and write the report where the spec says; 0 unless the report
    itself cannot be written (every failure of the run is in the report)."""
    from .env import own_process

    own_process()  # a worker's process is peftkit's (env.freeze_imported_objects)
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)

    from .config import RunConfig
    from .files import write_json

    cfg = RunConfig.from_dict(spec["config"])
    start = time.perf_counter()
    report = {"batch_size": cfg.batch_size, **_run(cfg, spec["log_path"])}
    report["seconds"] = time.perf_counter() - start
    write_json(spec["result_path"], report, indent=None)
    return 0


def _run(cfg: Any, log_path: str) -> dict[str, Any]:
    """``status`` and ``metrics`` or ``error`` of one run of ``cfg`` into its output directory."""
    from .env import quiet_libraries
    from .errors import set_context
    from .rundir import staged_dir
    from .train import execute_run, resolve

    def echo(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    try:
        cfg.validate()
        run = resolve(cfg)
        set_context(command="bench", strategy=run.strategy.name, model=cfg.model)  # a worker of peftkit bench
        quiet_libraries()
        with staged_dir(cfg.output_dir, overwrite=False) as stage:
            metrics = execute_run(run, stage, echo, data_said=True)  # the bench said it, once
        return {"status": "ok", "metrics": metrics}
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a row of the suite
        return failure_report(exc, log_path)


def failure_report(exc: BaseException, log_path: str) -> dict[str, Any]:
    """A worker's report of a run that raised ``exc``: ``oom`` (out of memory, or over the
    budget), else ``failed`` with one line (a library's: which one, strategy, model type, its
    message; the traceback appended to ``log_path``). Called inside the ``except`` block."""
    from .errors import PeftkitError, first_line, library_error_line, raising_library
    from .memory import is_out_of_memory

    if is_out_of_memory(exc):
        return {"status": "oom", "error": first_line(exc)}
    if isinstance(exc, PeftkitError):
        return {"status": "failed", "error": str(exc)}
    # one line, as the command line reports it: the library, strategy, model type, message
    library = raising_library(exc)
    what = library_error_line(exc, library) if library else f"{type(exc).__name__}: {first_line(exc)}"
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as fh:
        traceback.print_exc(file=fh)
    return {"status": "failed", "error": f"{what} (traceback in {log_path})"}


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1]))
    except KeyboardInterrupt:  # the suite reports an interruption, once; the run's staging is gone
        sys.exit(130)
