"""Training runs of the experiment suite: a run is a pure function of its config.

- :mod:`experiments.config`: the typed, validated run config; YAML + ``key=value`` overrides; run ids.
- :mod:`experiments.quantizers`: the registry of bottleneck kinds (``lfq``, ``bsq``: ``lfq.LFQ``;
  ``vq``, ``fsq``: the baselines of :mod:`experiments.baselines`), a config class per kind.
- :mod:`experiments.tasks`: the registry of tasks: ``images`` (a MAGVIT-v2-style tokenizer on shipped
  or your images), ``synthetic`` (MLP on a Gaussian mixture) and ``patches`` (conv tokenizer on
  natural-image patches shipped with scikit-image and scikit-learn).
- :mod:`experiments.train`: ``run(config, run_dir)`` and the CLI; the shared training loop is
  :mod:`experiments.loop`, what a run has reached :mod:`experiments.train_state`.
- :mod:`experiments.run_dir`: the run folder (resume, status, its lock), with :mod:`experiments.files`
  (the atomic writer, JSON and JSON-lines I/O), :mod:`experiments.folder_state` (RUN_STATES) and
  :mod:`experiments.run_lock` (one process per run folder) beside it.
"""
