"""Launching and watching sweeps through submitit: ``python -m slurm.submit`` and ``python -m slurm.status``.

``slurm`` only launches and watches; it imports ``experiments`` and nothing imports it back.
See slurm/submit.py (submission), slurm/state.py (sweep folder records, run states),
slurm/job.py (the job callable and its run lock), slurm/local.py (the throttled local pool),
slurm/profiles.py (cluster profiles) and slurm/local-cluster.sh (a one-node test cluster).
"""
