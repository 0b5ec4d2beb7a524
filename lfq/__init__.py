"""Lookup-Free Quantization (MAGVIT-v2, arXiv 2310.05737) with exact, fast entropy terms.

Importable with torch and einops alone; no file I/O.
"""

from lfq.entropy import ENTROPY_KERNELS, EntropyTerms
from lfq.monitor import LFQMonitor
from lfq.quantizer import LFQ, CodebookStats, LossBreakdown, Return, reverse_bits
from lfq.sinks import JsonlSink, MemorySink

__all__ = [
    "LFQ", "Return", "LossBreakdown", "CodebookStats", "EntropyTerms", "ENTROPY_KERNELS", "reverse_bits",
    "LFQMonitor", "MemorySink", "JsonlSink",
]
