"""A smaller copy of an ImageFolder zip (e.g. cifar100.zip) that gives the same long-tailed training set.

For carrying CIFAR-100 to a machine that cannot download it under a size limit (the lent GPU takes 64 MiB):
every test image and every training image the long-tail profiles of --ifs keep are copied byte for byte; the
other training images become a 1x1 gray PNG under their own names. Labels, member order and the class
sizes stay as they were, so `longtail_indices` picks the same images and the data set trains the same.

Cao et al.'s subsets are nested (each class keeps the first n_i of one seeded shuffle, and n_i shrinks as the
imbalance factor grows), so the IF-10 subset holds IF 50's and IF 100's: the default zip serves all three.

    python bench/lt_subset_zip.py ../shared/data/cifar100.zip .gpu/data/cifar100.zip             # IF 10, 50, 100
    python bench/lt_subset_zip.py ../shared/data/cifar100.zip .gpu/data/cifar100.zip --ifs 100   # IF 100 alone
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from mbib.data.imagefolder import index_imagefolder
from mbib.data.longtail import longtail_indices, lt_class_counts


def kept_members(source: Path, ifs: list[float], seed: int) -> tuple[list[str], set[str]]:
    """The training members (zip member names) in the loader's order, and those the long tails of `ifs` keep
    (the smallest imbalance factor's subset, which holds the others': checked, not assumed)."""
    index = index_imagefolder(source)
    members = [m for m, _ in index.train]
    labels = np.array([y for _, y in index.train])
    sizes = np.bincount(labels, minlength=len(index.classes))
    subsets = []
    for imbalance_factor in sorted(ifs):
        counts = lt_class_counts(len(index.classes), int(sizes.min()), imbalance_factor)
        subsets.append({members[i] for i in longtail_indices(labels, counts, seed)})
    if any(not later <= subsets[0] for later in subsets[1:]):  # the loader's subsets must stay nested
        raise SystemExit(f"the long-tail subsets of IF {sorted(ifs)} are not nested in {source}: make one zip per IF")
    return members, set().union(*subsets)


def placeholder() -> bytes:
    """A 1x1 gray PNG (about 70 bytes; the CIFAR loader resizes it like any odd-sized image)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def write_subset(source: Path, dest: Path, ifs: list[float], seed: int = 0) -> tuple[int, int]:
    """Write dest; returns (training images kept, training images replaced)."""
    members, kept = kept_members(source, ifs, seed)
    dropped = set(members) - kept
    gray = placeholder()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(tmp, "w") as out:
        for info in src.infolist():
            out.writestr(info, gray if info.filename in dropped else src.read(info), compress_type=zipfile.ZIP_STORED)
    tmp.replace(dest)
    return len(kept), len(dropped)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--ifs", default="10,50,100", help="comma-separated imbalance factors whose training images to keep")
    p.add_argument("--seed", type=int, default=0, help="the runs' runtime.seed, which seeds the long-tail subset")
    args = p.parse_args(argv)
    kept, dropped = write_subset(args.source, args.dest, [float(x) for x in args.ifs.split(",")], args.seed)
    size = args.dest.stat().st_size / 2**20
    print(f"{args.dest}: {kept} training images kept, {dropped} replaced by a 1x1 gray PNG; {size:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
