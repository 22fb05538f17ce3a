"""Data: in-memory image sets and batched transforms."""

from vitlab.data.datasets import BUILTIN, ImageTensors, balanced_subset, fashion_mnist, load_dataset, read_idx
from vitlab.data.transforms import AugmentConfig, EvalTransform, TrainTransform, match_channels, normalize

__all__ = ["BUILTIN", "AugmentConfig", "EvalTransform", "ImageTensors", "TrainTransform", "balanced_subset",
           "fashion_mnist", "load_dataset", "match_channels", "normalize", "read_idx"]
