"""A GPU profile's sbatch script asks for the GPUs, one task (DDP rank) per GPU."""

from __future__ import annotations

import pytest

from slurm.profiles import resolve_resources
from slurm.submit import slurm_executor

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


@pytest.mark.parametrize(("gpus", "tasks"), [(1, 1), (4, 4)])
def test_gpu_profile_sbatch_requests_gpus(tmp_path, gpus, tasks):
    _, params = resolve_resources({}, profile="gpu-example", overrides={"gpus": gpus})
    executor = slurm_executor(tmp_path, params, name="gpu-try")
    text = executor._executor._make_submission_file_text("python -c pass", "uid")
    assert f"#SBATCH --gpus-per-node={gpus}" in text
    # one rank per GPU (submitit's default is one task); each rank's LOCAL_RANK picks its device
    assert f"#SBATCH --ntasks-per-node={tasks}" in text or (tasks == 1 and "--ntasks-per-node" not in text)
    assert "#SBATCH --partition=gpu" in text
