"""Training runs of the experiment suite: a run is a pure function of its config.

- :mod:`experiments.config`: the typed, validated run config; YAML + ``key=value`` overrides; run ids.
- :mod:`experiments.quantizers`: the bottlenecks compared: ``lfq.LFQ``, a VQ and an FSQ baseline.
- :mod:`experiments.tasks`: ``synthetic`` (MLP on a Gaussian mixture) and ``patches`` (conv tokenizer
  on natural-image patches shipped with scikit-image and scikit-learn).
- :mod:`experiments.train`: the shared training loop, ``run(config, run_dir)``, and the CLI.
- :mod:`experiments.run_dir`: the run folder (atomic writes, resume, status).
"""
