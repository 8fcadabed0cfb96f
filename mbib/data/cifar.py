"""CIFAR-10/100 from torchvision's on-disk layout, read with pickle (no torchvision needed to read).

Pickle can run code, so the unpickler admits only the numpy globals an array needs; still, read trusted files
only (a cifar100.npz beside them is preferred, see mbib.data.datasets).

Layout: <root>/cifar-100-python/{train,test,meta} or <root>/cifar-10-batches-py/{data_batch_1..5,
test_batch,batches.meta}; each batch is a pickled dict with b'data' uint8 [N,3072] (RGB planes, row major)
and b'fine_labels' (CIFAR-100) or b'labels' (CIFAR-10).
"""

from __future__ import annotations

import pickle
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mbib.data.raw import RawData
from mbib.errors import DataError

DOWNLOAD_HOST = "www.cs.toronto.edu"  # where torchvision fetches CIFAR from


@dataclass(frozen=True)
class CifarLayout:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int


CIFAR100 = CifarLayout("CIFAR-100", "cifar-100-python", ("train",), ("test",), "meta",
                       b"fine_labels", b"fine_label_names", 100)
CIFAR10 = CifarLayout("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                      ("test_batch",), "batches.meta", b"labels", b"label_names", 10)


def has_cifar(root: Path, layout: CifarLayout) -> bool:
    folder = root / layout.folder
    return all((folder / f).is_file() for f in (*layout.train_files, *layout.test_files, layout.meta_file))


def read_cifar(root: Path, layout: CifarLayout) -> RawData:
    """Read the pickled batches under root/<layout.folder> into channels-last uint8 arrays."""
    folder = root / layout.folder
    x_train, y_train = _read_batches(folder, layout.train_files, layout)
    x_test, y_test = _read_batches(folder, layout.test_files, layout)
    meta = _unpickle(folder / layout.meta_file)
    names = meta.get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise DataError(f"{folder / layout.meta_file} lacks {layout.names_key!r} with {layout.num_classes} "
                        "class names: re-download the data set")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return RawData(x_train, y_train, x_test, y_test, classes)


def download_cifar(root: Path, layout: CifarLayout) -> None:
    """Fetch CIFAR through torchvision; fails fast (one-line DataError) when the host is unreachable."""
    if not _reachable(DOWNLOAD_HOST, timeout=3.0):
        raise DataError(f"{layout.title} not found under {root} and {DOWNLOAD_HOST} is unreachable: "
                        f"put torchvision's {layout.folder}/, a {_npz_name(layout)} there, "
                        "or pass --data-root / set MBIB_DATA_ROOT")
    try:
        import torchvision.datasets as tvd

        dataset_cls = tvd.CIFAR100 if layout is CIFAR100 else tvd.CIFAR10
        root.mkdir(parents=True, exist_ok=True)
        dataset_cls(str(root), train=True, download=True)
    except Exception as err:  # network and archive errors come in many types; all mean the same to the user
        raise DataError(f"downloading {layout.title} into {root} failed ({' '.join(str(err).split())}): "
                        f"put torchvision's {layout.folder}/, a {_npz_name(layout)} there") from err


def _npz_name(layout: CifarLayout) -> str:
    return f"cifar{layout.num_classes}.npz or cifar{layout.num_classes}.zip"


def _read_batches(folder: Path, files: tuple[str, ...], layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in files:
        path = folder / name
        batch = _unpickle(path)
        data, labels = batch.get(b"data"), batch.get(layout.label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            shape = getattr(data, "shape", None)
            raise DataError(f"array b'data' in {path} must be uint8 [N,3072], got "
                            f"{getattr(data, 'dtype', type(data).__name__)} {shape}: re-download the data set")
        labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
        if labels.shape != (len(data),) or (len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes)):
            raise DataError(f"{layout.label_key!r} in {path} must hold {len(data)} labels in "
                            f"0..{layout.num_classes - 1}: re-download the data set")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # planes -> channels last (npz format)
        ys.append(labels)
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes and numpy arrays; refuses every other global (what a hostile pickle calls)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError as err:
        raise DataError(f"{path} is missing: re-download the data set or provide an npz instead") from err
    except Exception as err:  # unpickling damaged bytes raises arbitrary types
        raise DataError(f"cannot unpickle {path} ({type(err).__name__}: {err}): re-download the data set") from err
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a pickled dict as torchvision's CIFAR files do: re-download it")
    return obj


def _reachable(host: str, timeout: float) -> bool:
    # DNS lookups ignore socket timeouts, so probe in a daemon thread we can stop waiting for.
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])
