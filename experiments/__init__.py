"""Training runs of the experiment suite: a run is a pure function of its config.

- :mod:`experiments.config`: the typed, validated run config; YAML + ``key=value`` overrides; run ids.
- :mod:`experiments.quantizers`: the registry of bottleneck kinds, one module per kind beside it
  (``binary``: ``lfq``, ``bsq``, i.e. ``lfq.LFQ``; ``vq``, ``fsq``: the baselines of
  :mod:`experiments.baselines`), each with its config class.
- :mod:`experiments.tasks`: the registry of tasks: ``images`` (a MAGVIT-v2-style tokenizer on shipped
  or your images), ``synthetic`` (MLP on a Gaussian mixture) and ``patches`` (conv tokenizer on
  natural-image patches shipped with scikit-image and scikit-learn).
- :mod:`experiments.train`: ``run(config, run_dir)``, one run read top to bottom, and the CLI; the
  machinery it drives (model, batches, schedules, what a run has reached) is :mod:`experiments.loop`.
- :mod:`experiments.run_dir`: the run folder's rules (its errors, resume checks, names and places),
  with :mod:`experiments.files` (the atomic writer, JSON and JSON-lines I/O) and
  :mod:`experiments.run_lock` (one process per run folder) beside it; the file names and state
  words are :mod:`common.run_state`'s.
"""
