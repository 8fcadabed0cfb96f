"""Reader for the project's image npz format (see shared/data/README.md): x uint8 [N,H,W,C], y int64 [N]."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from mbib.data.raw import RawData
from mbib.errors import DataError

ARRAYS = ("x_train", "y_train", "x_test", "y_test", "classes")


def read_npz(path: str | Path) -> RawData:
    """Load and validate an npz; any defect raises a one-line DataError naming the file and the array."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz data set {path} does not exist: pass the path of an npz holding {', '.join(ARRAYS)}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"cannot read {path} as an npz archive ({_short(err)}): re-create the file") from err
    with archive:
        missing = [name for name in ARRAYS if name not in archive.files]
        if missing:
            raise DataError(f"{path} lacks array(s) {', '.join(missing)}: an image npz needs {', '.join(ARRAYS)}")
        arrays = {name: _read_array(archive, name, path) for name in ARRAYS}
    return _validate(arrays, path)


def _read_array(archive, name: str, path: Path) -> np.ndarray:
    # Members decompress lazily, so a damaged member only shows up here.
    try:
        return archive[name]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as err:
        raise DataError(f"array '{name}' in {path} is corrupt ({_short(err)}): re-create the file") from err


def _validate(a: dict[str, np.ndarray], path: Path) -> RawData:
    classes = a["classes"]
    if classes.ndim != 1 or classes.dtype.kind not in "US" or len(classes) < 1:
        raise DataError(f"array 'classes' in {path} must be a 1-D string array of class names, "
                        f"got dtype {classes.dtype} shape {classes.shape}")
    num_classes = len(classes)
    for split in ("train", "test"):
        x, y = a[f"x_{split}"], a[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise DataError(f"array 'x_{split}' in {path} must be uint8 [N,H,W,C] with C in (1,3), "
                            f"got {x.dtype} {list(x.shape)}")
        if y.dtype.kind not in "iu" or y.ndim != 1 or len(y) != len(x):
            raise DataError(f"array 'y_{split}' in {path} must be integer [{len(x)}] (one label per image), "
                            f"got {y.dtype} {list(y.shape)}")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"array 'y_{split}' in {path} has labels outside 0..{num_classes - 1} "
                            f"(range {y.min()}..{y.max()})")
    if a["x_train"].shape[1:] != a["x_test"].shape[1:]:
        raise DataError(f"arrays 'x_train' and 'x_test' in {path} differ in image shape: "
                        f"{list(a['x_train'].shape[1:])} vs {list(a['x_test'].shape[1:])}")
    return RawData(a["x_train"], a["y_train"].astype(np.int64), a["x_test"], a["y_test"].astype(np.int64),
                   [str(c) for c in classes])


def _short(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__
