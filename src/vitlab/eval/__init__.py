"""Evaluation kept apart from training: top-k accuracy, confusion matrices, few-shot linear probes."""
