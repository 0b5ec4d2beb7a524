"""Launching and watching sweeps through submitit (``python -m slurm.submit``, ``python -m
slurm.status``): ``slurm`` imports ``experiments`` and nothing imports it back; docs/slurm.md
describes submission, profiles, the job, the local pool and status, and ``slurm/local-cluster.sh``
brings up a one-node test cluster.
"""
