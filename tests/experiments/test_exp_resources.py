"""Up-front memory estimates (experiments.resources) read the task's and the quantizer kind's registry entries."""

from __future__ import annotations

import pytest

from experiments.config import load_config
from experiments.quantizers import fsq
from experiments.resources import ResourceError, check_resources, estimate

DENSE = "quantizer.codebook_size x data.batch_size: the reference entropy's dense softmax"


@pytest.mark.parametrize("kind", ["lfq", "bsq"])
def test_the_reference_entropy_is_counted_for_lfq_and_bsq_with_the_tasks_tokens(kind: str) -> None:
    config = load_config("experiments/configs/images.yaml", [f"quantizer.kind={kind}", "quantizer.entropy_mode=reference",
                                                             "quantizer.codebook_size=65536", "data.batch_size=8"])
    parts = estimate(config)
    tokens = 8 * (64 // 8) ** 2  # 8 images of 8 x 8 tokens
    assert parts[DENSE] == tokens * 65536 * 4
    with pytest.raises(ResourceError, match="dense softmax alone takes .*lower quantizer.codebook_size or data.batch_size"):
        check_resources(config, available=tokens * 65536 * 4)


def test_exact_entropy_and_fsq_need_no_dense_softmax() -> None:
    for overrides in (["quantizer.entropy_mode=exact"], ["quantizer.kind=fsq"]):
        parts = estimate(load_config("experiments/configs/images.yaml", [*overrides, "quantizer.codebook_size=65536"]))
        assert DENSE not in parts
        assert parts["quantizer.codebook_size: the monitor's per-code counters"] == 8 * 65536 * 8


def test_a_kinds_memory_entry_is_what_the_estimate_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    huge = {"quantizer.codebook_size: a made-up table": 10**15}
    monkeypatch.setattr(fsq, "memory", lambda cfg, tokens: huge, raising=False)  # fsq's module defines none
    config = load_config("experiments/configs/synthetic.yaml", ["quantizer.kind=fsq"])
    assert estimate(config)["quantizer.codebook_size: a made-up table"] == 10**15
    with pytest.raises(ResourceError, match="a made-up table alone takes 1 PB; lower quantizer.codebook_size"):
        check_resources(config, available=10**12)
