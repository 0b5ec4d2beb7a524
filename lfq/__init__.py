"""Lookup-Free Quantization (MAGVIT-v2, arXiv 2310.05737) with exact, fast entropy terms, and the
monitor of codebook usage (docs/quantizer.md, docs/monitor.md); importable with torch and einops
alone: the TensorBoard and wandb sinks import their packages when constructed
(``pip install lfq-suite[tensorboard]`` / ``[wandb]``).
"""

from lfq.adapters import Adapter, BinaryAdapter
from lfq.entropy import ENTROPY_KERNELS, EntropyTerms
from lfq.monitor import LFQMonitor
from lfq.quantizer import LFQ, CodebookStats, LossBreakdown, Return
from lfq.quantizer_parts import reverse_bits
from lfq.records import Evaluation
from lfq.sinks import JsonlSink, MemorySink, Tee, TensorBoardSink, WandbSink

__all__ = [
    "LFQ", "Return", "LossBreakdown", "CodebookStats", "EntropyTerms", "ENTROPY_KERNELS", "reverse_bits",
    "LFQMonitor", "Evaluation", "MemorySink", "JsonlSink", "TensorBoardSink", "WandbSink", "Tee",
    "Adapter", "BinaryAdapter",
]
