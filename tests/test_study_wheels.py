"""bench/study_wheels.py: Ray's wheel rebuilt without what the study never imports, the set packed in parts."""

import importlib.util
import zipfile
from pathlib import Path

spec = importlib.util.spec_from_file_location("study_wheels", Path(__file__).parents[1] / "bench" / "study_wheels.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

KEPT = ["ray/__init__.py", "ray/tune/__init__.py", "ray/dashboard/client/build/static/js/main.js"]
DROPPED = ["ray/jars/ray_dist.jar", "ray/rllib/__init__.py", "ray/llm/__init__.py",
           "ray/dashboard/client/build/static/js/main.js.map"]


def test_ray_wheel_loses_jars_source_maps_rllib_and_llm_and_its_record_follows(tmp_path):
    src = tmp_path / "official" / "ray-2.60.0-cp311-cp311-manylinux2014_x86_64.whl"
    src.parent.mkdir()
    record = "".join(f"{n},sha256=x,1\n" for n in KEPT + DROPPED) + "ray-2.60.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(src, "w") as z:
        for n in KEPT + DROPPED:
            z.writestr(n, "x")
        z.writestr("ray-2.60.0.dist-info/RECORD", record)
        z.writestr("ray-2.60.0.dist-info/entry_points.txt",
                   "[console_scripts]\nray = ray.scripts.scripts:main\nrllib = ray.rllib.scripts:cli\n")
    out = tool.trim_ray(src, tmp_path)
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert set(KEPT) <= names and not set(DROPPED) & names
        kept_record = z.read("ray-2.60.0.dist-info/RECORD").decode()
        assert all(n in kept_record for n in KEPT) and not any(n in kept_record for n in DROPPED)
        assert z.read("ray-2.60.0.dist-info/entry_points.txt").decode().splitlines()[1:] == \
            ["ray = ray.scripts.scripts:main"]  # no script that would import the dropped RLlib


def test_wheels_are_packed_in_parts_under_the_limit_largest_first(tmp_path):
    sizes = {"a": 40, "b": 30, "c": 15, "d": 10, "e": 5}
    wheels = []
    for name, size in sizes.items():
        w = tmp_path / f"{name}-1.0-py3-none-any.whl"
        w.write_bytes(b"x" * size)
        wheels.append(w)
    parts = tool.split_parts(wheels, 50, tmp_path)
    packed = [sorted(w.name[0] for w in p.glob("*.whl")) for p in parts]
    assert packed == [["a", "d"], ["b", "c", "e"]]  # every part at most 50 bytes
    assert not list(tmp_path.glob("*.whl"))


def test_the_closure_follows_extras_and_stops_at_what_the_study_never_imports():
    found = tool.closure(["ray[default]"], "3.11")
    assert {"ray", "aiohttp", "pydantic", "jsonschema"} <= set(found)  # ray's own and its dashboard's needs
    assert not {"virtualenv", "py-spy"} & set(found)
