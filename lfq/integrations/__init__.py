"""Integrations of the monitor with training frameworks; each imports its framework when imported
itself (``lfq.integrations.lightning`` needs ``pip install lfq-suite[lightning]``)."""
