"""Data: built-in sets in memory, image folders listed once and decoded lazily in loader workers, per-sample and
batched transforms, WebDataset shards."""

from vitlab.data.datasets import BUILTIN, balanced_subset, fashion_mnist, load_dataset, read_idx
from vitlab.data.folder import FolderSplit, check_same_classes, folder_classes, list_image_folder, split_name
from vitlab.data.images import ImageLimits
from vitlab.data.loader import EvalBatches, TrainBatches, default_workers, eval_batches, folder_batches
from vitlab.data.preprocess import (
    BatchMix,
    Preprocessing,
    SampleEvalTransform,
    SampleTrainTransform,
    normalize_batch,
)
from vitlab.data.tensors import ImageTensors
from vitlab.data.transforms import AugmentConfig, EvalTransform, TrainTransform, match_channels, normalize

__all__ = ["AugmentConfig", "BUILTIN", "BatchMix", "EvalBatches", "EvalTransform", "FolderSplit", "ImageLimits",
           "ImageTensors", "Preprocessing", "SampleEvalTransform", "SampleTrainTransform", "TrainBatches",
           "TrainTransform", "balanced_subset", "check_same_classes", "default_workers", "eval_batches",
           "fashion_mnist", "folder_batches", "folder_classes", "list_image_folder", "load_dataset",
           "match_channels", "normalize", "normalize_batch", "read_idx", "split_name"]
