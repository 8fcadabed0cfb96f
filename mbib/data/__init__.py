"""Data: long-tailed image sets in memory, batched augmentation, DDP batching, ImageNet-LT/iNat file lists."""

from mbib.data.augment import cifar_augment, normalize
from mbib.data.datasets import IMAGEFOLDER, ImageData, imagefolder_path, load_dataset
from mbib.data.filelist import FileListData, FileListDataset, imagefolder_filelist_data, load_filelist_data
from mbib.data.imagefolder import ImageFolderIndex, index_imagefolder, read_imagefolder
from mbib.data.loader import BatchIterator
from mbib.data.longtail import lt_class_counts

__all__ = ["lt_class_counts", "ImageData", "load_dataset", "cifar_augment", "normalize", "BatchIterator",
           "FileListData", "FileListDataset", "load_filelist_data", "IMAGEFOLDER", "imagefolder_path",
           "ImageFolderIndex", "index_imagefolder", "read_imagefolder", "imagefolder_filelist_data"]
