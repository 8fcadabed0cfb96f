"""Studies against a real `mlflow server` process: artifacts and the registry over HTTP, a server that is not
there at the start, and one that goes away mid-study (its connections cut by a relay; nothing lost: --resume
logs what it missed)."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from mbib.raylocal import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env():
    e = dict(os.environ, MBIB_DATA_ROOT="")  # the bundled digits: the smoke study's one offline data set
    e.pop("RAY_ADDRESS", None)
    e.pop("MLFLOW_TRACKING_URI", None)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return e


def _study(tmp, uri, *args):
    cmd = [sys.executable, str(REPO / "studies" / "cifar_grid.py"), "--smoke", "--num-samples", "1", "--epochs", "1",
           "--storage-path", str(tmp / "runs"), "--tracking-uri", uri, "--name", "t", *args]
    return subprocess.Popen(cmd, cwd=tmp, env=_env(), stdout=open(tmp / "driver.log", "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _server(tmp, port):
    proc = subprocess.Popen(["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
                             "--artifacts-destination", str(tmp / "served-artifacts")],
                            cwd=tmp, stdout=open(tmp / "server.log", "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    for _ in range(600):  # until the server answers (no fixed sleep: start-up takes long on a busy machine)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            assert proc.poll() is None, (tmp / "server.log").read_text()[-2000:]
            time.sleep(0.5)
    raise AssertionError("mlflow server did not start")


class Cut:
    """A TCP relay in front of the server, on a port of its own: cut() drops every connection and refuses new ones,
    as a server that went away would; restore() listens again on the same port. Cheaper than a second server."""

    def __init__(self, upstream: int):
        self.upstream, self.port, self.links, self.lock = upstream, free_port(), [], threading.Lock()
        self.restore()

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() that close alone would leave listening
        self.listener.close()
        with self.lock:
            for s in self.links:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.links.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                near, _ = listener.accept()
            except OSError:  # cut
                return
            far = socket.create_connection(("127.0.0.1", self.upstream))
            with self.lock:
                self.links += [near, far]
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _trial_runs(client):
    exps = [e.experiment_id for e in client.search_experiments()]
    return exps and client.search_runs(exps, "tags.`mbib.trial_id` != ''")


def _stop(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_unreachable_server_stops_the_study_in_one_line_before_any_trial(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    assert _study(tmp_path, uri).wait(timeout=300) == 2
    out = (tmp_path / "driver.log").read_text()
    assert f"error: no MLflow server answers at {uri}" in out and "Traceback" not in out
    assert not (tmp_path / "runs").exists()  # no trial ran


@pytest.mark.timeout(1800)  # two short studies on a busy 2-core machine
def test_study_through_a_server_that_goes_away_loses_nothing_after_resume(tmp_path):
    from mlflow.tracking import MlflowClient

    from mbib.study.record import TAG_LATE

    port = free_port()
    server = _server(tmp_path, port)
    relay = Cut(port)
    uri = f"http://127.0.0.1:{relay.port}"  # the study's way to the server; the test's own client goes direct
    client = MlflowClient(f"http://127.0.0.1:{port}", registry_uri=f"http://127.0.0.1:{port}")
    driver = None
    try:
        driver = _study(tmp_path, uri)
        deadline = time.time() + 600
        while not _trial_runs(client):
            assert driver.poll() is None and time.time() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(1)
        relay.cut()  # the first trial is running: everything after this is what the server missed
        assert driver.wait(timeout=900) == 2, (tmp_path / "driver.log").read_text()[-3000:]
        errors = [ln for ln in (tmp_path / "driver.log").read_text().splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: the MLflow server at {uri} stopped answering")
        assert "--resume" in errors[0]

        relay.restore()
        assert _study(tmp_path, uri, "--resume").wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-3000:]
        exp = client.get_experiment_by_name("t")
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on training runs
        runs = client.search_runs([exp.experiment_id], max_results=100)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1 and len(kids) == 1  # one trial of the one data set, no duplicates
        assert any(TAG_LATE in k.data.tags for k in kids)  # the run says its records came late
        for k in kids:
            assert k.info.status == "FINISHED" and "acc" in k.data.metrics and "epochs_done" in k.data.metrics
            assert [d.dataset.name for d in k.inputs.dataset_inputs] == [k.data.tags["mbib.dataset"]]
            assert k.info.run_name.startswith("#")
        for p in parents:
            assert p.info.run_name.startswith(p.data.tags["mbib.dataset"])  # the data set first, not cut off
            assert {a.path for a in client.list_artifacts(p.info.run_id, "plots")} >= {"plots/beta_curve.png"}
            mv = client.get_model_version(p.data.tags["mbib.registered_model"], p.data.tags["mbib.registered_version"])
            local = client.download_artifacts(mv.run_id, "model/artifacts/checkpoint.pt", str(tmp_path))  # through the server
            assert Path(local).stat().st_size > 0
        assert (tmp_path / "served-artifacts").is_dir()  # artifacts went through the server, not to the driver's disk
        assert not (tmp_path / "mlartifacts").exists()
    finally:
        if driver is not None and driver.poll() is None:
            _stop(driver)
        relay.cut()
        _stop(server)
