"""The adversarial game under DDP: two gloo ranks on the CPU train the images smoke config with a
discriminator, the adaptive weight and LeCAM. Both networks are wrapped, so every rank ends every
step with the same discriminator's weights, bit for bit, and every rank's generator term takes the same
adaptive weight (the ranks' mean, computed once per step)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from exp_helpers import run, smoke_config
from rank_process import rank_process, spawn_with_deadline

from experiments import distributed as ddp
from experiments.distributed import free_port
from experiments.objective import Objective

WORLD = 2
SPAWN_TIMEOUT_S = 180
STEPS = 6
IMAGES_YAML = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "images.yaml"


def _config():
    return smoke_config("loss.adversarial_weight=0.1", "loss.disc_start=2", "loss.lecam_weight=0.01",
                        f"schedule.steps={STEPS}", "data.batch_size=8", path=IMAGES_YAML)


@rank_process
def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    seen: dict[str, list] = {"weights": [], "disc": []}
    generator_loss, discriminator_step = Objective.generator_loss, Objective.discriminator_step

    def record_weight(self, step, *args):
        loss = generator_loss(self, step, *args)
        seen["weights"].append([step, float(self.last.get("adaptive_weight", torch.tensor(float("nan"))))])
        return loss

    def record_disc(self, step, *args):
        discriminator_step(self, step, *args)
        # parameters only: batch norm's running statistics are each rank's (DDP broadcasts rank 0's at the next
        # forward), and in training mode, the only one the discriminator runs in, they change no output
        state = b"".join(p.detach().numpy().tobytes() for p in self.disc.parameters())
        state += b"".join(b.numpy().tobytes() for b in self.lecam.buffers())  # LeCAM's averages too
        seen["disc"].append([step, hashlib.sha256(state).hexdigest()])

    Objective.generator_loss, Objective.discriminator_step = record_weight, record_disc
    with ddp.process_group():
        summary = run(_config(), Path(out) / "run")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"summary": summary, **seen}))


def test_both_ranks_play_one_game(tmp_path: Path) -> None:
    spawn_with_deadline(_worker, (free_port(), str(tmp_path)), WORLD, SPAWN_TIMEOUT_S)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["summary"]["status"] == "done" and ranks[1]["summary"] == ranks[0]["summary"]
    # the game starts after step 2: steps 3..6 have a weight, the same on both ranks to the bit
    weights = [dict((s, w) for s, w in r["weights"] if s > 2) for r in ranks]
    assert sorted(weights[0]) == [3, 4, 5, 6] and weights[0] == weights[1]
    assert all(w > 0 for w in weights[0].values())
    # one discriminator: after every update both ranks hold the same weights and LeCAM averages, to the bit
    # (a rank resumes from rank 0's checkpoint, so any state a rank kept apart would break its resume)
    assert [s for s, _ in ranks[0]["disc"] if s > 2] == [3, 4, 5, 6]
    assert ranks[0]["disc"] == ranks[1]["disc"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "train" and r["step"] > 2 and r["d_loss"] == r["d_loss"] for r in rows)
