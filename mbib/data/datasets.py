"""`load_dataset`: a named data set, long-tailed, in memory as uint8 tensors [N,3,H,W] ready for batching.

Every source is turned into the same shape: grayscale is repeated to 3 channels and images smaller than
32x32 are zero-padded (centred) to 32x32, so MNIST (28x28x1) becomes 3x32x32 with a 2-pixel black border.
The training set is long-tailed with Cao et al.'s profile, max_count = the smallest class's size (500 for
CIFAR-100, 5,000 for CIFAR-10, 713 for mnist10k); the test set stays complete and balanced.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import torch
import torch.nn.functional as F

from mbib.data.cifar import CIFAR10, CIFAR100, CifarLayout, download_cifar, has_cifar, read_cifar
from mbib.data.digits import read_digits
from mbib.data.imagefolder import ImageFolderIndex, index_imagefolder, read_imagefolder
from mbib.data.longtail import longtail_indices, lt_class_counts
from mbib.data.npz import read_npz
from mbib.data.raw import RawData
from mbib.data.recompress import check_recompress, recompress_images
from mbib.errors import ConfigError, DataError

ENV_ROOT = "MBIB_DATA_ROOT"
DEFAULT_CIFAR_ROOT = Path("~/.cache/mbib/data")  # where CIFAR is looked for / downloaded without a data root
MIN_SIZE = 32
# Cao et al. normalise CIFAR-10 and CIFAR-100 alike with these constants (the paper follows their processing).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
NAMES = ("cifar100-lt", "cifar10-lt", "mnist-lt", "digits-lt", "npz:PATH", "imagefolder:PATH")
IMAGEFOLDER = "imagefolder:"
PATH_PREFIXES = ("npz:", IMAGEFOLDER)  # data sets named by the path of their file or folder


@dataclass
class ImageData:
    """A long-tailed training set and a balanced test set, uint8 [N,C,H,W] and int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    class_counts: list[int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    recompress: str = "none"  # the dose its images were given when it was built (mbib.data.recompress)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.x_test.shape[-1])


def resolve_data_root(data_root: str | os.PathLike | None) -> Path | None:
    """The data root: the argument, else $MBIB_DATA_ROOT, else None."""
    root = data_root if data_root not in (None, "") else os.environ.get(ENV_ROOT) or None
    return Path(root).expanduser() if root is not None else None


def pinned_data_root(data_root: str | os.PathLike | None) -> str | None:
    """The data root (argument, else $MBIB_DATA_ROOT) as an absolute path, or None: configs handed to Ray
    workers must not depend on the driver's working directory or environment."""
    root = resolve_data_root(data_root)
    return str(root.resolve()) if root is not None else None


def pinned_dataset(name: str) -> str:
    """"npz:PATH" and "imagefolder:PATH" with PATH made absolute, for workers in other working directories."""
    for prefix in PATH_PREFIXES:
        if name.strip().lower().startswith(prefix):
            return prefix + str(Path(name.strip()[len(prefix):]).expanduser().resolve())
    return name


def same_dataset(a: str, b: str) -> bool:
    """Data set names match; one named by a path (npz:PATH, imagefolder:PATH) by its prefix and the path's last
    part, so a run continued on another machine, where the same data lies in another folder, is accepted."""
    def key(name: str) -> str:
        prefix = next((p for p in PATH_PREFIXES if name.strip().lower().startswith(p)), None)
        return prefix + PurePath(name.strip()[len(prefix):]).name if prefix else name
    return key(a) == key(b)


def load_dataset(name: str, data_root: str | os.PathLike | None = None, imbalance_factor: float | None = 100,
                 seed: int = 0, download: bool = True, image_size: int | None = None,
                 recompress: str = "none") -> ImageData:
    """Load `name` (see NAMES) long-tailed by IF (None: the training set as stored).

    `image_size` resizes the images of an image folder that differ from it (None: they must share one size);
    `recompress` doses every kept image once (mbib.data.recompress: none, q50, chroma).
    """
    check_recompress(recompress)
    if imbalance_factor is not None and imbalance_factor < 1:
        raise ConfigError(f"imbalance factor must be >= 1 (N_max/N_min), got {imbalance_factor}")
    key = name.strip().lower()
    keep_name = name.strip() if key.startswith(PATH_PREFIXES) else key
    root = resolve_data_root(data_root)
    stats, selection = None, None
    if key.startswith("npz:"):
        raw = read_npz(Path(name.strip()[4:]).expanduser())
    elif key.startswith(IMAGEFOLDER):
        raw, selection = read_longtail_imagefolder(index_imagefolder(imagefolder_path(name)), keep_name,
                                                   imbalance_factor, seed, image_size)
    elif key in ("cifar100-lt", "cifar10-lt"):
        raw, selection = _load_cifar(CIFAR100 if key == "cifar100-lt" else CIFAR10, root, download, imbalance_factor,
                                     seed)
        stats = (CIFAR_MEAN, CIFAR_STD)
    elif key == "mnist-lt":
        raw = _load_mnist(root)
    elif key == "digits-lt":
        raw = read_digits()
    else:
        raise ConfigError(f"unknown data set '{name}': choose one of {', '.join(NAMES)}")
    return build_longtail(raw, keep_name, imbalance_factor, seed, stats, selection, recompress)


def imagefolder_path(name: str) -> Path:
    """The PATH of "imagefolder:PATH"."""
    return Path(name.strip()[len(IMAGEFOLDER):]).expanduser()


Selection = tuple[list[int], np.ndarray]  # (class counts, indices of the training images kept, in order)


def longtail_selection(y_train: np.ndarray, num_classes: int, name: str, imbalance_factor: float | None,
                       seed: int) -> Selection:
    """Which training images the long tail keeps, from the labels alone (IF None: all, grouped by class)."""
    sizes = np.bincount(y_train, minlength=num_classes)
    if sizes.min() == 0:
        raise DataError(f"data set '{name}' has no training images for class {int(np.argmin(sizes))}: "
                        "every class needs at least one")
    if imbalance_factor is None:
        return sizes.tolist(), np.argsort(y_train, kind="stable")
    counts = lt_class_counts(num_classes, int(sizes.min()), imbalance_factor)
    return counts, longtail_indices(y_train, counts, seed)


def read_longtail_imagefolder(index: ImageFolderIndex, name: str, imbalance_factor: float | None, seed: int,
                              image_size: int | None) -> tuple[RawData, Selection]:
    """Decode only the training images the long tail keeps, in its order (CIFAR-100 at IF 100: 10,847 of
    50,000), with the selection that takes all of them: the same data as decoding everything, ~3x sooner."""
    labels = np.fromiter((y for _, y in index.train), dtype=np.int64, count=len(index.train))
    counts, keep = longtail_selection(labels, len(index.classes), name, imbalance_factor, seed)
    raw = read_imagefolder(dataclasses.replace(index, train=[index.train[k] for k in keep]), image_size)
    return raw, (counts, np.arange(len(keep)))


def build_longtail(raw: RawData, name: str, imbalance_factor: float | None, seed: int,
                   stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                   selection: Selection | None = None, dose: str = "none") -> ImageData:
    """Long-tail raw's training set (deterministic for a seed; IF None keeps it as stored; `selection` when
    raw was read already long-tailed), dose both splits' images (`dose`: a data.recompress value; the long tail
    is chosen from the labels, so it keeps the same images) and convert them to [N,3,H>=32,W>=32]."""
    counts, keep = selection or longtail_selection(raw.y_train, len(raw.classes), name, imbalance_factor, seed)
    x_train = to_model_layout(recompress_images(raw.x_train[keep], dose))
    mean, std = stats if stats is not None else channel_stats(x_train)
    x_test = to_model_layout(recompress_images(raw.x_test, dose))
    return ImageData(name=name, x_train=x_train, y_train=torch.from_numpy(raw.y_train[keep].copy()),
                     x_test=x_test, y_test=torch.from_numpy(raw.y_test.copy()), classes=list(raw.classes),
                     class_counts=counts, mean=tuple(mean), std=tuple(std), recompress=dose)


def to_model_layout(x_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,C] -> contiguous uint8 [N,3,H',W']: gray repeated to RGB, zero-padded to at least 32x32."""
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc)).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    pad_h, pad_w = max(0, MIN_SIZE - x.shape[2]), max(0, MIN_SIZE - x.shape[3])
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return x.contiguous()


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images [N,C,H,W] in [0,1] units, chunked."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk].to(torch.float64).div_(255.0)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def cifar_source(layout: CifarLayout, root: Path | None) -> Path | None:
    """What CIFAR is read from, in this order: cifarN.npz (read with allow_pickle=False, so preferred),
    torchvision's pickled folder, cifarN.zip (ImageFolder JPEGs); None when none is there."""
    where = root if root is not None else DEFAULT_CIFAR_ROOT.expanduser()
    stem = f"cifar{layout.num_classes}"
    if (where / f"{stem}.npz").is_file():
        return where / f"{stem}.npz"
    if has_cifar(where, layout):
        return where / layout.folder
    return where / f"{stem}.zip" if (where / f"{stem}.zip").is_file() else None


def _load_cifar(layout: CifarLayout, root: Path | None, download: bool, imbalance_factor: float | None,
                seed: int) -> tuple[RawData, Selection | None]:
    where = root if root is not None else DEFAULT_CIFAR_ROOT.expanduser()
    source = cifar_source(layout, root)
    if source is None:
        if not download:
            stem = f"cifar{layout.num_classes}"
            raise DataError(f"{layout.title} not found under {where}: put torchvision's {layout.folder}/, a "
                            f"{stem}.npz or a {stem}.zip there, or pass --data-root / set {ENV_ROOT}")
        download_cifar(where, layout)
        source = where / layout.folder
    if source.name == layout.folder:
        return read_cifar(source.parent, layout), None
    if source.suffix == ".npz":
        raw, selection = read_npz(source), None
    else:
        raw, selection = read_longtail_imagefolder(index_imagefolder(source), layout.title, imbalance_factor, seed, 32)
    if len(raw.classes) != layout.num_classes:
        raise DataError(f"{source} holds {len(raw.classes)} classes, not {layout.num_classes}: put {layout.title} there")
    return raw, selection


def _load_mnist(root: Path | None) -> RawData:
    if root is None:
        raise DataError(f"mnist-lt needs mnist10k.npz but no data root is set: pass --data-root DIR or set "
                        f"{ENV_ROOT}=DIR (the folder holding mnist10k.npz)")
    path = root / "mnist10k.npz"
    if not path.is_file():
        raise DataError(f"mnist10k.npz not found under {root}: put it there, or pass --data-root / set {ENV_ROOT} "
                        "to the folder holding it")
    return read_npz(path)
