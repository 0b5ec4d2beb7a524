"""``entropy_mode="clamped"`` under torch.distributed: the same check
as ``test_distributed.py`` (two gloo ranks with different batch sizes and token counts, one
of them possibly empty; terms and gradients equal one process on the global batch)."""

from __future__ import annotations

import pytest
import test_distributed as ddp


@pytest.mark.parametrize("empty_rank", [False, True])
def test_clamped_under_ddp_equals_one_process(empty_rank: bool) -> None:
    ddp.test_ddp_terms_and_gradients_equal_one_process_on_the_global_batch("clamped", empty_rank)

