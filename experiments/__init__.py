"""Training runs of the experiment suite, where a run is a pure function of its config: configs,
tasks, quantizer kinds, the trainer and the run folder's rules; docs/ARCHITECTURE.md says which
module owns what, docs/training.md how a run trains and docs/experiments.md how configs and sweeps
are written.
"""
