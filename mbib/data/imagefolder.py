"""Image sets in torchvision's ImageFolder layout, from a folder or a .zip: `<split>/<class>/<image>`.

The splits are `train/` and `test/` (or `val/`), either at the top or inside one top folder (as in
`cifar100.zip`: `cifar100/train/apple/...`). Class names are the folder names; labels follow their sorted
order, as torchvision's ImageFolder assigns them. Hidden files and OS clutter (`.DS_Store`, `Thumbs.db`,
`__MACOSX/`) are skipped; every other file in a class folder must decode as an image.

Small images are decoded once, in parallel, into the project's in-memory format (`RawData`, uint8 NHWC),
resized to `image_size` where they differ; large sets stay files (`ImageFolderIndex` -> file-list data sets).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from mbib.data.raw import RawData
from mbib.errors import DataError

TRAIN_SPLIT = "train"
TEST_SPLITS = ("test", "val")  # the first one present is the evaluation split
CLUTTER = {".DS_Store", "Thumbs.db", "desktop.ini"}
CHUNK = 512  # members decoded per thread task
LAYOUT = "<split>/<class>/<image> with splits train/ and test/ (or val/), at the top or inside one top folder"


@dataclass(frozen=True)
class ImageFolderIndex:
    """What an image folder or zip holds, before any decoding: members per split, labels, class names."""

    source: Path
    classes: list[str]
    train: list[tuple[str, int]]  # (member path, label): relative to `source` (folder) or zip member names
    test: list[tuple[str, int]]
    test_split: str

    @property
    def is_zip(self) -> bool:
        return self.source.suffix.lower() == ".zip"

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[str], bytes]]:
        """A reader of one member's bytes (zip reads share one open archive; zipfile serialises them)."""
        if not self.is_zip:
            yield lambda member: (self.source / member).read_bytes()
            return
        with zipfile.ZipFile(self.source) as archive:
            yield archive.read

    def __len__(self) -> int:
        return len(self.train) + len(self.test)


def index_imagefolder(path: str | os.PathLike) -> ImageFolderIndex:
    """List an ImageFolder-layout folder or zip and check its layout; one-line DataError on any defect."""
    source = Path(path).expanduser()
    if not source.exists():
        raise DataError(f"image folder {source} does not exist: pass a folder or .zip laid out as {LAYOUT}")
    files, folders = _zip_listing(source) if source.is_file() else _folder_listing(source)
    root = _split_root(source, files, folders)
    splits: dict[str, dict[str, list[str]]] = {}
    for name in files:
        rel = _relative(name, root)
        if rel is None or len(rel.parts) != 3:
            continue  # files beside the class folders (a README, a licence) are not images of a class
        split, cls, _ = rel.parts
        splits.setdefault(split, {}).setdefault(cls, []).append(name)
    for name in folders:  # class folders without a single file are reported, not silently dropped
        rel = _relative(name, root)
        if rel is not None and len(rel.parts) == 2:
            splits.setdefault(rel.parts[0], {}).setdefault(rel.parts[1], [])
    test_split = next((s for s in TEST_SPLITS if s in splits), None)
    if TRAIN_SPLIT not in splits or test_split is None:
        found = ", ".join(sorted(splits)) or "none"
        raise DataError(f"{source} is not in ImageFolder layout (splits found: {found}): expected {LAYOUT}")
    train, test = splits[TRAIN_SPLIT], splits[test_split]
    if set(train) != set(test):
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise DataError(f"class folders differ between {TRAIN_SPLIT}/ and {test_split}/ in {source}: "
                        f"only in {TRAIN_SPLIT}/: {_names(only_train)}; only in {test_split}/: {_names(only_test)}; "
                        "give both splits the same class folders")
    for split, classes in ((TRAIN_SPLIT, train), (test_split, test)):
        empty = sorted(c for c, members in classes.items() if not members)
        if empty:
            raise DataError(f"class folder(s) {_names(empty)} in {split}/ of {source} hold no images: "
                            "add images or remove the folder from both splits")
    classes = sorted(train)
    label = {c: i for i, c in enumerate(classes)}
    listed = lambda split: [(m, label[c]) for c in classes for m in sorted(split[c], key=_natural)]  # noqa: E731
    return ImageFolderIndex(source, classes, listed(train), listed(test), test_split)


def read_imagefolder(index: ImageFolderIndex, image_size: int | None = None, workers: int | None = None) -> RawData:
    """Decode both splits into uint8 NHWC RGB arrays; images that are not image_size x image_size are resized
    to it (None: keep them as stored, which needs one size throughout)."""
    with index.reader() as read:
        x_train = _decode_all(index, index.train, read, image_size, workers)
        x_test = _decode_all(index, index.test, read, image_size, workers)
    labels = lambda items: np.fromiter((y for _, y in items), dtype=np.int64, count=len(items))  # noqa: E731
    return RawData(x_train, labels(index.train), x_test, labels(index.test), list(index.classes))


def _decode_all(index: ImageFolderIndex, items: list[tuple[str, int]], read: Callable[[str], bytes],
                size: int | None, workers: int | None) -> np.ndarray:
    """Decode in threads, a chunk of members each (torchvision's decoders release the GIL), and stack."""
    workers = workers or min(8, os.cpu_count() or 1)
    members = [m for m, _ in items]
    chunks = [members[i:i + CHUNK] for i in range(0, len(members), CHUNK)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        images = [img for chunk in pool.map(lambda c: [_decode(index, m, read, size) for m in c], chunks)
                  for img in chunk]
    first = images[0].shape
    odd = next((i for i, img in enumerate(images) if img.shape != first), None)
    if odd is not None:
        size_of = lambda shape: f"{shape[1]}x{shape[0]}"  # noqa: E731
        raise DataError(f"images in {index.source} differ in size ({members[0]} is {size_of(first)}, "
                        f"{members[odd]} is {size_of(images[odd].shape)}): set data.image_size to resize them "
                        "to one size")
    return np.stack(images)


def _decode(index: ImageFolderIndex, member: str, read: Callable[[str], bytes], size: int | None) -> np.ndarray:
    """One member as uint8 HWC RGB: torchvision's decoders (JPEG, PNG, WebP, GIF), Pillow for other formats."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    data = read(member)
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        img = torch.from_numpy(_decode_pil(index, member, data)).permute(2, 0, 1)
    if size is not None and tuple(img.shape[1:]) != (size, size):
        img = torch.nn.functional.interpolate(img[None].float(), size=(size, size), mode="bilinear",
                                              antialias=True, align_corners=False)[0].round().clamp(0, 255).byte()
    return img.permute(1, 2, 0).numpy()


def _decode_pil(index: ImageFolderIndex, member: str, data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    where = f"{index.source}!{member}" if index.is_zip else str(index.source / member)
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)  # convert forces the whole decode
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise DataError(f"{where} is not a decodable image ({type(err).__name__}): replace or delete it") from err


def _zip_listing(source: Path) -> tuple[list[str], list[str]]:
    if source.suffix.lower() != ".zip":
        raise DataError(f"{source} is a file but not a .zip: pass a folder or a .zip laid out as {LAYOUT}")
    try:
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"cannot open {source} as a zip ({type(err).__name__}): re-create the archive") from err
    kept = [n for n in names if not _is_clutter(PurePosixPath(n))]
    return [n for n in kept if not n.endswith("/")], [n.rstrip("/") for n in kept if n.endswith("/")]


def _folder_listing(source: Path) -> tuple[list[str], list[str]]:
    files, folders = [], []
    for dirpath, dirnames, filenames in os.walk(source):
        rel = Path(dirpath).relative_to(source)
        dirnames[:] = [d for d in dirnames if not _is_clutter(PurePosixPath(d))]
        folders += [(rel / d).as_posix() for d in dirnames]
        files += [(rel / f).as_posix() for f in filenames if not _is_clutter(PurePosixPath(f))]
    return files, folders


def _is_clutter(path: PurePosixPath) -> bool:
    return any(p.startswith(".") or p in CLUTTER or p == "__MACOSX" for p in path.parts)


def _split_root(source: Path, files: list[str], folders: list[str]) -> PurePosixPath:
    """"" when the splits are at the top, else the one top folder that holds them."""
    tops = {PurePosixPath(n).parts[0] for n in files if len(PurePosixPath(n).parts) > 1}
    tops |= {PurePosixPath(n).parts[0] for n in folders if n}
    if TRAIN_SPLIT in tops:
        return PurePosixPath("")
    if len(tops) == 1:
        return PurePosixPath(tops.pop())
    raise DataError(f"{source} is not in ImageFolder layout (top-level entries: {_names(sorted(tops))}): "
                    f"expected {LAYOUT}")


def _relative(name: str, root: PurePosixPath) -> PurePosixPath | None:
    path = PurePosixPath(name)
    if root.parts and path.parts[:len(root.parts)] != root.parts:
        return None
    return PurePosixPath(*path.parts[len(root.parts):])


def _natural(name: str) -> tuple:
    """Numbers in file names sort numerically (img2 before img10), as the CIFAR zip stores them."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit]) or "none"
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
