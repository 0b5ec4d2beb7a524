"""The newest upstream and the 1.14.12 oracle load side by side (tests/upstream_vqp.py)."""

import sys

import torch
import vector_quantize_pytorch as oracle
from upstream_vqp import latest_version, load_latest


def test_latest_and_oracle_coexist():
    latest = load_latest()
    assert latest is not oracle
    assert sys.modules["vector_quantize_pytorch"] is oracle  # the oracle's modules are back
    assert "spherical" in latest.LFQ.__init__.__code__.co_varnames  # a flag 1.14.12 lacks
    assert "spherical" not in oracle.LFQ.__init__.__code__.co_varnames
    assert latest_version() != "unknown"
    torch.manual_seed(0)
    q = latest.LFQ(codebook_size=16, dim=4)
    out = q(torch.randn(2, 8, 4))
    assert out.quantized.shape == (2, 8, 4)
