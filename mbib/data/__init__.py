"""Data: long-tailed image sets in memory, batched augmentation, DDP batching, ImageNet-LT/iNat file lists."""

from mbib.data.augment import cifar_augment, normalize
from mbib.data.datasets import ImageData, load_dataset
from mbib.data.filelist import FileListData, FileListDataset, load_filelist_data
from mbib.data.loader import BatchIterator
from mbib.data.longtail import lt_class_counts

__all__ = ["lt_class_counts", "ImageData", "load_dataset", "cifar_augment", "normalize", "BatchIterator",
           "FileListData", "FileListDataset", "load_filelist_data"]
