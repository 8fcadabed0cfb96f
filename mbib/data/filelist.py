"""ImageNet-LT and iNaturalist 2018 from their published file lists ("relative/path label" per line).

The lists (ImageNet_LT_train.txt, ImageNet_LT_test.txt, iNaturalist18_train.txt, iNaturalist18_val.txt,
as released with Liu et al. 2019 / Kang et al. 2020) sit in the data root, and the image paths in them are
relative to that root. Images are decoded lazily with PIL, so wrap the datasets in a torch DataLoader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mbib.data.datasets import ENV_ROOT, resolve_data_root
from mbib.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FILE_LISTS = {
    "imagenet-lt": ("ImageNet_LT_train.txt", "ImageNet_LT_test.txt"),
    "inat2018": ("iNaturalist18_train.txt", "iNaturalist18_val.txt"),
}


def imagenet_transform(train: bool):
    """Standard 224x224 pipeline: train RandomResizedCrop+flip+ColorJitter, test Resize 256+CenterCrop."""
    from torchvision import transforms as T

    if train:
        steps = [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4, 0)]
    else:
        steps = [T.Resize(256), T.CenterCrop(224)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def read_file_list(path: Path) -> tuple[list[str], list[int]]:
    """Parse "relative/path label" lines; blank lines are skipped."""
    if not path.is_file():
        raise DataError(f"file list {path} not found: put it there, or pass --data-root / set {ENV_ROOT}")
    paths, labels = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(f"{path} line {number} is not 'relative/path label': {line.strip()[:80]!r}")
            paths.append(parts[0])
            labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"file list {path} is empty: it needs one 'relative/path label' line per image")
    return paths, labels


class FileListDataset(Dataset):
    """Images named by a file list under `root`; items are (float image [3,224,224], int64 label).

    ``list_file`` is a "relative/path label" file (relative to root unless absolute); ``items`` gives the
    (paths, labels) directly instead (image folders).
    """

    def __init__(self, root: str | os.PathLike, list_file: str | os.PathLike | None = None, train: bool = True,
                 transform=None, items: tuple[list[str], list[int]] | None = None):
        self.root = Path(root)
        if items is None:
            list_path = Path(list_file)
            self.list_file = list_path if list_path.is_absolute() else self.root / list_path
            self.paths, self.labels = read_file_list(self.list_file)
        else:
            self.list_file, (self.paths, self.labels) = None, (list(items[0]), list(items[1]))
        self.transform = transform if transform is not None else imagenet_transform(train)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1

    def class_counts(self, num_classes: int | None = None) -> list[int]:
        counts = torch.bincount(torch.tensor(self.labels), minlength=num_classes or self.num_classes)
        return counts.tolist()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path = self.root / self.paths[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # forces the full decode, so truncated files fail here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL's decode errors
            reason = " ".join(str(err).split())[:120]
            where = f"from {self.list_file.name}" if self.list_file is not None else "from its folder"
            raise DataError(f"cannot read image {path} ({type(err).__name__}: {reason}): replace it or remove it "
                            f"{where}") from err
        return self.transform(img), self.labels[index]


class IndexedViews(Dataset):
    """Items of another dataset as (views, label, index): ``views`` transformed draws of the image, stacked
    as [V, 3, H, W] when V > 1 (GML's classifier/query/key views), plus the dataset index."""

    def __init__(self, dataset: Dataset, views: int = 1):
        self.dataset, self.views = dataset, views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        draws = [self.dataset[index] for _ in range(self.views)]  # each call applies the random transform anew
        x = draws[0][0] if self.views == 1 else torch.stack([d[0] for d in draws])
        return x, draws[0][1], index


@dataclass
class FileListData:
    """Train and test datasets of a file-list data set and the training images per class."""

    name: str
    train: FileListDataset
    test: FileListDataset
    class_counts: list[int]
    num_classes: int
    class_names: list[str] | None = None  # None: the labels' numbers
    # what the train/test transforms normalise with and crop to (imagenet_transform)
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    image_size = 224

    @property
    def classes(self) -> list[str]:
        """Class names, as ImageData has them: the folder names, or the labels' numbers for file lists."""
        return list(self.class_names) if self.class_names else [str(i) for i in range(self.num_classes)]


def load_filelist_data(name: str, data_root: str | os.PathLike | None = None) -> FileListData:
    """"imagenet-lt" or "inat2018" from the file lists in the data root (argument or $MBIB_DATA_ROOT)."""
    key = name.strip().lower()
    if key not in FILE_LISTS:
        raise ConfigError(f"unknown file-list data set '{name}': choose one of {', '.join(FILE_LISTS)}")
    root = resolve_data_root(data_root)
    if root is None:
        raise DataError(f"{key} needs a data root holding {FILE_LISTS[key][0]} and the images: "
                        f"pass --data-root DIR or set {ENV_ROOT}=DIR")
    train_list, test_list = FILE_LISTS[key]
    train = FileListDataset(root, train_list, train=True)
    test = FileListDataset(root, test_list, train=False)
    num_classes = max(train.num_classes, test.num_classes)
    return FileListData(key, train, test, train.class_counts(num_classes), num_classes)


def imagefolder_filelist_data(name: str, index) -> FileListData:
    """An image folder too large to hold decoded in memory, read file by file with the 224x224 transforms."""
    if index.is_zip:
        raise DataError(f"{index.source} holds {len(index):,} images, too many to decode into memory: unzip it and "
                        f"pass the folder (imagefolder:FOLDER), whose images are then read file by file")
    train, test = ([[m for m, _ in split], [y for _, y in split]] for split in (index.train, index.test))
    train_set = FileListDataset(index.source, train=True, items=train)
    test_set = FileListDataset(index.source, train=False, items=test)
    counts = torch.bincount(torch.tensor(train[1]), minlength=len(index.classes)).tolist()
    return FileListData(name, train_set, test_set, counts, len(index.classes), list(index.classes))
