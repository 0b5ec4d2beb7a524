"""The quantizer's schedules: pure functions of the step, applied by the training loop.

``lfq.LFQ`` keeps no training-loop state: the loop sets ``entropy_loss_weight`` and
``commitment_loss_weight`` on every quantizer of the model and passes the inverse temperature
through the task's model (``model.inv_temperature``) before each step, and logs the values it
set on the step's ``kind="train"`` row (``entropy_weight``, ``inv_temperature``,
``commitment_weight``).
"""

from __future__ import annotations

import math

from torch import nn

from experiments.config import Config


def ramp(shape: str, start: float, end: float, steps: int, step: int) -> float:
    """``start`` at step 0 to ``end`` at ``steps`` along ``shape``, then ``end``."""
    if shape == "constant" or steps <= 0 or step >= steps:
        return end
    t = step / steps
    if shape == "linear":
        return start + (end - start) * t
    if shape == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))
    if shape == "exponential":
        return start * (end / start) ** t
    raise ValueError(f"unknown schedule shape {shape!r}: expected constant, linear, cosine or exponential")


def values_at(step: int, config: Config) -> dict[str, float]:
    """The entropy weight, inverse temperature and commitment weight in force at ``step``."""
    a, q = config.anneal, config.quantizer
    entropy = q.entropy_loss_weight * (1.0 if a.entropy == "constant" else ramp(a.entropy, a.entropy_start, 1.0,
                                                                                 a.entropy_steps, step))
    commitment = q.commitment_loss_weight * (1.0 if a.commitment == "constant" else ramp(
        a.commitment, a.commitment_start, 1.0, a.commitment_steps, step))
    inv_temperature = q.inv_temperature if a.inv_temperature == "constant" else ramp(
        a.inv_temperature, a.inv_temperature_start, q.inv_temperature, a.inv_temperature_steps, step)
    return {"entropy_weight": entropy, "inv_temperature": inv_temperature, "commitment_weight": commitment}


def apply(model: nn.Module, values: dict[str, float]) -> None:
    """Set the values on the model: every quantizer's weights, the model's inverse temperature."""
    for module in model.modules():
        if hasattr(module, "entropy_loss_weight"):
            module.entropy_loss_weight = values["entropy_weight"]
        if hasattr(module, "commitment_loss_weight") and hasattr(module, "codebook_size"):
            module.commitment_loss_weight = values["commitment_weight"]
    if hasattr(model, "inv_temperature"):
        model.inv_temperature = values["inv_temperature"]
