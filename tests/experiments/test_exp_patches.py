"""The patches dataset: built from shipped images only, with a fixed split by source image."""

from __future__ import annotations

import hashlib
import socket

import pytest
import torch
from exp_helpers import PATCHES_YAML, smoke_config

from experiments.tasks import patches


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access during a test: the patches dataset must build offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    patches.load_patches.cache_clear()
    yield
    patches.load_patches.cache_clear()


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("size", [16, 32])
def test_builds_offline_with_a_fixed_split(offline, size):
    train, val = patches.load_patches(size)
    assert train.dtype == val.dtype == torch.uint8
    assert train.shape[1:] == val.shape[1:] == (3, size, size)
    assert len(train) > 5 * len(val) > 0
    patches.load_patches.cache_clear()
    train2, val2 = patches.load_patches(size)  # built again from scratch: the same bytes
    assert digest(train) == digest(train2) and digest(val) == digest(val2)


def test_split_is_by_source_image():
    assert not set(patches.TRAIN_IMAGES) & set(patches.VAL_IMAGES)
    assert len(patches.TRAIN_IMAGES) >= 10 and len(patches.VAL_IMAGES) >= 3


def test_dataset_batches_and_validation_set():
    config = smoke_config("data.val_size=100", path=PATCHES_YAML).resolved()
    data = patches.build_dataset(config)
    assert data.val.shape == (100, 3, 16, 16)
    assert 0 <= data.val.min() and data.val.max() <= 1
    g = torch.Generator().manual_seed(0)
    batch = data.train_batch(g, 8)
    assert batch.shape == (8, 3, 16, 16) and batch.dtype == torch.float32
    assert torch.equal(batch, data.train_batch(torch.Generator().manual_seed(0), 8))
    # The validation set does not depend on the run's seed.
    other = patches.build_dataset(smoke_config("data.val_size=100", "seed=5", path=PATCHES_YAML).resolved())
    assert torch.equal(other.val, data.val)


def test_tokenizer_makes_a_grid_of_tokens():
    config = smoke_config("quantizer.codebook_size=64", path=PATCHES_YAML).resolved()
    model = patches.build_model(config)
    out = model(torch.rand(2, 3, 16, 16))
    assert out.recon.shape == (2, 3, 16, 16)
    assert out.indices.shape == (2, 4, 4)  # 16 / 4 tokens a side, one codebook
