"""The "same numbers" reference: every registered method on each data path, two fp32 steps at a fixed seed, and an
old committed checkpoint resumed for two steps. `python tests/same_numbers.py` (re)writes same_numbers.json, which
tests/test_same_numbers.py holds the code to: regenerate it only for a change meant to alter the numbers.

Tiny inputs keep it to seconds: 24 images of 3 long-tailed classes, batches of 8, ResNet-32.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from mbib.checkpoint import load_checkpoint
from mbib.config import TrainConfig, apply_overrides
from mbib.data import ImageData
from mbib.data.filelist import FileListData, FileListDataset
from mbib.methods import METHODS
from mbib.train.engine import Engine
from mbib.train.fit import restore

REPO = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).with_name("same_numbers.json")
CHECKPOINT = "bench/results/h200/cells/reproduction-cifar100-lt-200ep/grid-mbib-IF100-seed0.pt"  # Table 1 MBIB cell
CPU = torch.device("cpu")
COUNTS = (12, 8, 4)  # images per class: long-tailed, so the balanced losses differ from plain CE
STEPS = 2

# (method, data path, GML views): every method in memory, GML also with one view, and the file-list path
FILE_LIST_CASES = (("mbib", 3), ("gml", 3), ("mbib-gml", 1))


def cases() -> list[tuple[str, str, int]]:
    memory = [(m, "memory", 3) for m in sorted(METHODS)]
    one_view = [(m, "memory", 1) for m in ("gml", "mbib-gml")]
    return memory + one_view + [(m, "filelist", v) for m, v in FILE_LIST_CASES]


def case_name(method: str, path: str, views: int) -> str:
    return f"{method}/{path}" + (f"/{views}views" if method in ("gml", "mbib-gml") else "")


def config(method: str, views: int) -> TrainConfig:
    # a one-epoch warm-up over the 3 steps of an epoch: the lr and the VSD ramp both move between the two steps;
    # DRW from epoch 0 so LDAM's re-weighting is in the numbers
    return apply_overrides(TrainConfig(), {
        "loss.method": method, "loss.gml_views": views, "loss.drw_epoch": 0, "optim.batch_size": 8,
        "optim.warmup_epochs": 1, "optim.lr": 0.05, "data.loader_workers": 0, "runtime.amp": False,
        "runtime.channels_last": False, "runtime.compile": False, "runtime.seed": 0})


def labels() -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(COUNTS)), torch.tensor(COUNTS))


def memory_data() -> ImageData:
    y = labels()
    x = torch.randint(0, 256, (len(y), 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ImageData(name="tiny", x_train=x, y_train=y, x_test=x[:6], y_test=y[:6], classes=["a", "b", "c"],
                     class_counts=list(COUNTS), mean=(0.5,) * 3, std=(0.25,) * 3)


def file_list_data(root: Path) -> FileListData:
    """The same images as PNG files, read through a DataLoader with 32-pixel transforms (not the 224 ones)."""
    from PIL import Image
    from torchvision import transforms as T

    d = memory_data()
    paths = []
    for i, img in enumerate(d.x_train):
        paths.append(f"{i}.png")
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / paths[-1])
    norm = [T.ToTensor(), T.Normalize(d.mean, d.std)]
    train = FileListDataset(root, items=(paths, d.y_train.tolist()),
                            transform=T.Compose([T.RandomResizedCrop(32), T.RandomHorizontalFlip(), *norm]))
    test = FileListDataset(root, items=(paths[:6], d.y_test.tolist()), transform=T.Compose(norm))
    return FileListData("tiny-files", train, test, list(COUNTS), len(COUNTS))


def moved_scale(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """sum |d(x + x^2)| over every weight x a step moved: the checksum's change sums these with signs, so they
    cancel, and another CPU's rounding of the change is a fraction of this sum, not of the change itself."""
    with torch.no_grad():
        return float(sum(((a.double() - b.double()).abs() * (1 + b.double().abs() + a.double().abs())).sum()
                         for b, a in zip(before, after, strict=True)))


def step_record(engine: Engine, batches) -> dict[str, Any]:
    """The checksum before, then each step's loss terms, the checksum after it and moved_scale."""
    record: dict[str, Any] = {"checksum": engine.param_checksum(), "steps": []}
    for _ in range(STEPS):
        before = [t.detach().clone() for t in engine.task.state_tensors()]
        _, terms = engine.train_step(next(batches))
        record["steps"].append({"terms": {k: float(v) for k, v in sorted(terms.items())},
                                "checksum": engine.param_checksum(),
                                "moved_scale": moved_scale(before, engine.task.state_tensors())})
    return record


def run_case(method: str, path: str, views: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        data = memory_data() if path == "memory" else file_list_data(Path(tmp))
        engine = Engine(config(method, views), data, CPU)
        return step_record(engine, engine.epoch_batches(0))


def resume_checkpoint(path: Path = REPO / CHECKPOINT) -> dict[str, Any]:
    """The committed cell restored into an engine of its own config (fp32, CPU) on 16 stand-in images of its
    classes, then two steps of its epoch 200 (one past its last): what loading and resuming gives."""
    state = load_checkpoint(path)
    spec = state["data_spec"]
    cfg = apply_overrides(TrainConfig.from_dict(state["config"]), {
        "optim.epochs": int(state["epoch"]) + 2, "optim.batch_size": 8, "data.loader_workers": 0,
        "runtime.amp": False, "runtime.channels_last": False, "runtime.compile": False})
    y = torch.arange(16) * 6 % len(spec["classes"])  # head, middle and tail classes
    x = torch.randint(0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    data = ImageData(name=cfg.data.dataset, x_train=x, y_train=y, x_test=x[:4], y_test=y[:4], classes=spec["classes"],
                     class_counts=spec["class_counts"], mean=tuple(spec["mean"]), std=tuple(spec["std"]))
    engine = Engine(cfg, data, CPU)
    progress = restore(engine, state, CHECKPOINT)
    return {"start_epoch": progress.start_epoch, "global_step": engine.global_step,
            **step_record(engine, engine.epoch_batches(progress.start_epoch))}


def reference() -> dict[str, Any]:
    return {"cases": {case_name(*c): run_case(*c) for c in cases()}, "checkpoint": resume_checkpoint()}


if __name__ == "__main__":
    torch.set_num_threads(1)  # the numbers must not depend on the thread count
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REFERENCE
    out.write_text(json.dumps(reference(), indent=1) + "\n")
    print(f"wrote {out}")
