"""One benchmark run in its own process: ``python -m peftkit.bench_worker SPEC.json``.

Started by ``peftkit bench`` (``peftkit.bench.spawn_worker``), never by users. It runs one
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


def main(spec_path: str) -> int:
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)

    from .cli import _quiet_libraries
    from .config import RunConfig
    from .errors import PeftkitError, first_line, library_error_line, raising_library, set_context
    from .memory import is_out_of_memory
    from .rundir import staged_dir
    from .train import execute_run, resolve

    cfg = RunConfig(**spec["config"])
    report: dict = {"batch_size": cfg.batch_size}
    start = time.perf_counter()

    def echo(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    try:
        cfg.validate()
        run = resolve(cfg)
        set_context(strategy=run.strategy.name, model=cfg.model)
        _quiet_libraries()
        with staged_dir(cfg.output_dir, overwrite=False) as stage:
            metrics = execute_run(run, stage, echo)
        report.update(status="ok", metrics=metrics)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a row of the suite
        if is_out_of_memory(exc):
            report.update(status="oom", error=first_line(exc))
        elif isinstance(exc, PeftkitError):
            report.update(status="failed", error=str(exc))
        else:
            # one line, as the command line reports it: the library, strategy, model type, message
            library = raising_library(exc)
            what = library_error_line(exc, library) if library else f"{type(exc).__name__}: {first_line(exc)}"
            report.update(status="failed", error=f"{what} (traceback in {spec['log_path']})")
            os.makedirs(os.path.dirname(spec["log_path"]), exist_ok=True)
            with open(spec["log_path"], "a", encoding="utf-8") as fh:
                traceback.print_exc(file=fh)
    report["seconds"] = time.perf_counter() - start
    tmp = spec["result_path"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(report, fh, default=str)
    os.replace(tmp, spec["result_path"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
