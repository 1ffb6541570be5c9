"""``peftkit bench``: every strategy on the same model and data, measured side by side.

Each (strategy, seed) runs in a fresh worker process, so one run's memory cannot leak into the next
one's figures, and a crash or an out-of-memory in one run is a row in the table, not the end of the
suite. Every run gets the same data, split (per seed), sequence length and *effective* batch size;
under a memory budget the micro-batch shrinks and gradient accumulation makes up the difference.
Beside the runs stands an input-blind baseline on the same test splits (``Task.baseline``), and a
strategy that does not beat it is flagged: a short run can look like learning while it only answers
the most frequent label.

``peftkit.api.bench`` checks the inputs and calls this package; the files, in the order a bench
goes through them:

- ``config.py``: ``BenchConfig`` (what was asked) and the parsers of ``--strategies``, ``--seeds``,
  ``--train-sizes``; ``plan_train_sizes``.
- ``preflight.py``: every setting checked, then the data and model loaded once (the planner's
  predictions, each seed's baseline), before any worker starts.
- ``tuned.py``: ``--tune``: each strategy's study (the ``peftkit.tuning`` machinery).
- ``suite.py``: ``run_bench`` and ``run_suite``: every row, a progress line and time left each, the
  files written into a staging directory renamed into place at the end.
- ``ladder.py``: one row: the lever ladder (``--auto-fit``) and the micro-batches tried until a run
  fits the budget; ``describe_levers``.
- ``worker.py``: one run in its own process (``python -m peftkit.benchmark.worker``), both sides.
- ``summary.py``: how rows are read: the quality metric, the rows shown, each strategy's summary over
  its seeds, the paired test against the best, the baseline (``peftkit.stats`` is the statistics).
- ``results.py``: what results.json holds.
- ``report.py``: results.md, rendered from results.json (``peftkit bench`` prints its notes too).

The suite writes results.json, results.md, the plots (``peftkit.plots``) and runs/<strategy>-seed<N>/;
with ``--tune`` also tuning/STRATEGY/, with ``--train-sizes`` a table per size and learning_curve.png.
"""
