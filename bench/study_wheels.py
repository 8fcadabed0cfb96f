"""The wheels a machine without a package registry needs to run the study: Ray (trimmed), MLflow, Optuna and
whichever of their dependencies that machine lacks, for its Python.

Which packages: the dependency closure of the study's roots, at the versions installed here (the ones this
project tests with), less the packages the machine already has (a list, one name a line: bench/gpu_packages.txt
for the lent H200). Ray's official manylinux wheel is rebuilt without what the study never imports (the Java
jars, the dashboard's source maps, RLlib, Ray LLM): 79 MB -> about 45 MB, so the set fits a 64 MiB carry.

    python bench/study_wheels.py .whl --python 3.12     # the set for the H200 (bench/gpu_study.sh installs it)
    python bench/study_wheels.py /tmp/w --python 3.11    # the same set for this machine's Python (the local check)
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

# the study's roots: Ray with the extras the study starts (the dashboard's state API, Tune, Train), MLflow's
# client and SQLite store (sqlalchemy, alembic: mlflow-skinny leaves them out), Optuna, and mbib's own imports
ROOTS = ("ray[default,tune,train]", "mlflow-skinny", "sqlalchemy", "alembic", "optuna", "numpy", "pillow",
         "scikit-learn", "matplotlib", "tqdm", "rich", "pyyaml")
# what the study never imports, left out of the rebuilt Ray wheel (checked by running the study on the result)
RAY_DROP = re.compile(r"^ray/(jars|rllib|llm)/|^ray/dashboard/client/build/.*\.map$")
# required on paper, never imported by the study (runtime-env virtualenvs, the dashboard's py-spy profiler,
# TensorBoard logging); the closure stops at them
NOT_USED = {"virtualenv", "py-spy", "tensorboardx"}
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux1_x86_64")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots, python: str) -> dict[str, str]:
    """{name: version installed here} of the roots and everything they require for `python` (extras followed)."""
    env = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0"}
    found: dict[str, str] = {}
    todo = [(Requirement(r), "") for r in roots]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = norm(req.name)
        if name in NOT_USED:
            continue
        seen = name in found
        try:
            found[name] = md.version(req.name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{req.name} is not installed here: install it (pip install {req.name}) and rerun") from None
        for sub in md.requires(req.name) or []:
            r = Requirement(sub)
            extras = [e for e in req.extras] or [""]
            for e in extras:
                if not seen or e:
                    todo.append((r, e))
    return found


def machine_has(path: Path) -> set[str]:
    return {norm(line.strip()) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}


def download(name: str, version: str, python: str, dest: Path) -> None:
    """pip download of one wheel for that Python's manylinux x86-64 (a pure-Python wheel where there is one)."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python, "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(dest),
           f"{name}=={version}"]
    subprocess.run(cmd, check=True)


def trim_ray(wheel: Path, dest: Path) -> Path:
    """Ray's wheel rebuilt without RAY_DROP's files (RECORD and the rllib console script follow)."""
    out = dest / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out.with_suffix(".tmp"), "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if RAY_DROP.search(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not RAY_DROP.search(line.decode().split(",", 1)[0]))
            elif info.filename.endswith(".dist-info/entry_points.txt"):
                data = b"".join(line for line in data.splitlines(keepends=True) if b"ray.rllib" not in line)
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    out.with_suffix(".tmp").replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dest", type=Path, help="folder for the wheels (keep it out of git: e.g. .whl, ignored)")
    p.add_argument("--python", default="3.12", help="the target machine's Python, major.minor")
    p.add_argument("--part-mib", type=float, default=42.0,
                   help="most MiB of wheels per part folder (one device call carries one part beside the tree)")
    p.add_argument("--has", type=Path, default=Path(__file__).with_name("gpu_packages.txt"),
                   help="the packages the target machine already has, one a line")
    args = p.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for made in args.dest.glob("part*/*.whl"):  # an earlier set: pip download skips the wheels it finds
        made.replace(args.dest / made.name)
    need = {n: v for n, v in closure(ROOTS, args.python).items() if n not in machine_has(args.has)}
    official = args.dest / "official"
    official.mkdir(exist_ok=True)
    for name, version in sorted(need.items()):
        download(name, version, args.python, official if name == "ray" else args.dest)
    for wheel in args.dest.glob("*.whl"):  # one version of each, only what is needed: two stop the install there
        name, version = wheel.name.split("-")[:2]
        if need.get(norm(name)) != version:
            wheel.unlink()
    ray = trim_ray(next(official.glob(f"ray-{need['ray']}-*.whl")), args.dest)
    ray_mib = ray.stat().st_size / 2**20
    parts = split_parts(sorted(args.dest.glob("*.whl")), args.part_mib * 2**20, args.dest)
    total = sum(w.stat().st_size for part in parts for w in part.glob("*.whl"))
    print(f"{len(need)} wheels for Python {args.python}: {total / 2**20:.1f} MiB (ray {ray_mib:.1f} "
          f"MiB after trimming; the official wheel stays in {official})")
    for part in parts:
        print(f"  {part}: {sum(w.stat().st_size for w in part.glob('*.whl')) / 2**20:.1f} MiB, "
              f"{len(list(part.glob('*.whl')))} wheels")
    print("carried:", " ".join(f"{n}=={v}" for n, v in sorted(need.items())))
    return 0


def split_parts(wheels: list[Path], limit: float, dest: Path) -> list[Path]:
    """Move the wheels into dest/part1, part2, ... of at most `limit` bytes each, largest first."""
    sizes: list[int] = []
    folders: list[Path] = []
    for w in sorted(wheels, key=lambda w: -w.stat().st_size):
        size = w.stat().st_size
        i = next((i for i, used in enumerate(sizes) if used + size <= limit), len(sizes))
        if i == len(sizes):
            sizes.append(0)
            folders.append(dest / f"part{i + 1}")
            folders[i].mkdir(exist_ok=True)
        sizes[i] += size
        w.replace(folders[i] / w.name)
    return folders


if __name__ == "__main__":
    sys.exit(main())
