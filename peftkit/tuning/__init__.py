"""``peftkit tune``: a strategy's hyper-parameters searched with Optuna, selected on validation only.

The parent process holds the study (TPE sampler, seeded; a pruner) and asks it for each trial's
settings through the strategy's own search space (``Strategy.search_space``); each trial trains in
a worker process of its own, so a crash or an out-of-memory is a failed trial, not the end. After
each epoch's validation the worker sends the tuned metric up a pipe; the parent reports it to the
study and answers ``go`` or ``prune``. A trial's objective is its best epoch's validation value.
Trial 0 of every study is the strategy's defaults, and it is never pruned, so the tuned result is
never worse on validation.

``peftkit.api.tune`` checks the inputs and calls this package (``bench --tune`` too:
``peftkit.benchmark.tuned``); the files, in the order a tune goes through them:

- ``config.py``: ``TuneConfig`` (what was asked), ``TunePlan`` (the same resolved: ``plan_tune``),
  the checks of ``--metric`` and ``--space``.
- ``storage.py``: where the study lives (``open_storage``, ``masked``) and every use of Optuna's
  private API: heartbeats, stale trials failed, interrupted trials marked.
- ``search.py``: the study opened or continued (``open_study``) and trials run until ``--trials``
  count (``optimize``), a progress line each.
- ``trial.py``: one trial: its settings (``SearchTrial``, trial 0, ``best_config``), its run in a
  worker (``run_trial``), and the words for how trials stand (``trial_state``, ``TrialCounts``).
- ``worker.py``: the trial's own process (``python -m peftkit.tuning.worker``).
- ``output.py``: the output directory, the reports staged, and the end: the best configuration
  trained once more as a run (``finish_tune``).
- ``report.py``: trials.json / .csv, best.yaml, the plots, and the closing lines.

The study lives in a storage (an SQLite file ``study.db`` in the output directory by default, or
any database URL SQLAlchemy takes) that is written as trials finish: it is what a second ``tune``
into the same directory (or storage and study name) continues, and what several processes share.
"""
