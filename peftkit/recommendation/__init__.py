"""``peftkit recommend``: which strategy to use on this model, data and machine, under a memory and
a time budget, answered by measuring. (The package is ``recommendation``: ``peftkit.recommend`` is
the API function, which a package of that name would shadow.)

- ``config``: ``RecommendConfig``, what was asked.
- ``run``: the candidates planned against the memory budget, the time budget checked, the output
  directory made or continued, then the search, the decision and the report.
- ``search``: successive halving over strategy x configuration on training-set sizes, each run a
  bench row in its own process, recorded in an optuna study per strategy (a rerun continues it).
- ``decide``: the finalists compared on the test split; the cheaper of two that a paired test cannot
  tell apart is recommended; one paragraph in plain words.
- ``report``: recommend.md, results.json, plots and ``best/``.
"""

from .config import RecommendConfig

__all__ = ["RecommendConfig"]
