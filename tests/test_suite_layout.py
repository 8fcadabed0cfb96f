"""The suite's own layout holds: under xdist every test of the exported model (Serve's among them) runs in one worker.

Two Serve apps at once collide on HAProxy's fixed stats port, and a second worker would export the model again; the
conftest's marks only group tests if they land before xdist turns them into node ids.
"""

import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

DUMMY = '''
import os
import pytest

@pytest.fixture(scope="session")
def exported():  # stands in for the real one: only its name decides the group
    return os.environ["PYTEST_XDIST_WORKER"]

@pytest.mark.parametrize("i", range(6))
def test_end_to_end(exported, i):
    print("E2E", exported)

@pytest.mark.parametrize("i", range(6))
def test_unit(i):
    pass
'''


def test_the_exported_models_tests_share_one_xdist_worker(tmp_path):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_dummy.py").write_text(DUMMY)
    out = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider",
                          "-o", "addopts=", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    e2e = [line for line in out.stdout.splitlines() if "PASSED" in line and "test_end_to_end" in line]
    assert len(e2e) == 6 and all(line.rstrip().endswith("@serving") for line in e2e), e2e
    assert len({line.split()[0] for line in e2e}) == 1, e2e  # "[gw0]" or "[gw1]": one worker for all of them
