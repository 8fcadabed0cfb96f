"""Studies on a real local Ray (each study driver in its own process, as `python studies/cifar_grid.py` runs), and
the pieces around them (ports, cluster files, Optuna's view of stopped trials) alone."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _env(**extra):
    """This checkout's mbib first (for the driver and, through the environment, Ray's workers); no outer cluster.
    A None value removes that variable."""
    e = {k: v for k, v in dict(os.environ, **extra).items() if v is not None}
    e.pop("RAY_ADDRESS", None)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return e


def _driver(tmp_path, *args, env=None, launcher=()):
    """The smoke study's driver process; `launcher`: python arguments that run the script (CLUSTER_SCRIPT)."""
    e = _env(**(env or {}))
    cmd = [sys.executable, *launcher, str(REPO / "studies" / "cifar_grid.py"), "--smoke",
           "--storage-path", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--name", "t", *args]
    return subprocess.Popen(cmd, cwd=tmp_path, env=e, stdout=open(tmp_path / "driver.log", "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _client(tmp_path):
    from mbib import tracking

    return tracking.store_client(f"sqlite:///{tmp_path / 'mlflow.db'}")  # its registry too, whatever env says


CLUSTER_SCRIPT = r"""
import os, runpy, sys
from ray.cluster_utils import Cluster
import ray
port, script = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                        "dashboard_port": int(port)})
nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
ray.init(address=cluster.address, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": os.environ["RAY_API_SERVER_ADDRESS"]}})
print("NODES", *(n.node_id for n in nodes), flush=True)
sys.argv = sys.argv[2:]
code = 1
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as done:
    code = done.code
finally:
    ray.shutdown()
    cluster.shutdown()
sys.exit(code)
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke study (2 one-epoch trials per data set) run by its script on a two-node local cluster (a head
    with no CPUs, two 1-CPU workers): one study for its MLflow records and for where its trials ran."""
    from mbib.raylocal import free_port

    tmp = tmp_path_factory.mktemp("smoke")
    # three evaluations: the chosen one need not be the last
    proc = _driver(tmp, "--num-samples", "2", "--epochs", "3", launcher=("-c", CLUSTER_SCRIPT, str(free_port())))
    assert proc.wait(timeout=900) == 0, (tmp / "driver.log").read_text()[-3000:]
    return tmp


@pytest.mark.slow
def test_smoke_study_logs_parent_child_runs_plots_and_registers(smoke):
    from mbib.study.cli import smoke_datasets
    from mbib.study.spec import SEARCH_SPACE
    from mbib.tracking.registry import load_registered_checkpoint
    from mbib.checkpoint import model_from_checkpoint

    out = (smoke / "driver.log").read_text()
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    client = _client(smoke)
    exp = client.get_experiment_by_name("t")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == len(smoke_datasets()) and len(children) >= 2 * len(parents)  # digits, + MNIST when present
    for p in parents:
        kids = [c for c in children if c.data.tags["mlflow.parentRunId"] == p.info.run_id]
        assert len(kids) == 2 and len({c.data.tags["mbib.trial_id"] for c in kids}) == 2
        for c in kids:
            assert set(SEARCH_SPACE) <= set(c.data.params) and "train_total" in c.data.metrics
        arts = {a.path for a in client.list_artifacts(p.info.run_id, "plots")}
        assert {f"plots/{n}.png" for n in ("best_so_far", "beta_curve", "ab_heatmap", "importances")} <= arts
        assert "best_acc" in p.data.metrics and "best_beta" in p.data.params
        # Optuna proposed the trials: the first is the paper's point, the second TPE's seeded proposal
        tried = [{k: float(c.data.params[k]) for k in SEARCH_SPACE} for c in kids]
        paper = {"beta": 5.0, "a": 0.1, "b": 0.3, "m": 0.1, "gamma": 0.0}
        tpe = {k: round(v, 6) for k, v in _tpe_proposals(seed=0, n=1)[0].items()}
        assert sorted(map(str, [{k: round(v, 6) for k, v in t.items()} for t in tried])) == \
            sorted(map(str, [paper, tpe]))
        # the best trial is the child with the highest selection score, chosen on the selection split
        assert p.data.tags["mbib.selected_on"].startswith("the selection split: 50%")
        assert p.data.tags["mbib.reported_on"].startswith("the held-out split")
        history = {c.data.tags["mbib.trial_id"]: [(m.value, int(m.step)) for m in
                                                 client.get_metric_history(c.info.run_id, "select_acc")] for c in kids}
        assert all(len(h) == 3 for h in history.values()) and all("heldout_acc" in c.data.metrics for c in kids)
        top = max(v for h in history.values() for v, _ in h)
        tied = [t for t in history if max(v for v, _ in history[t]) == top]
        paper_id = next(c.data.tags["mbib.trial_id"] for c in kids
                        if {k: float(c.data.params[k]) for k in SEARCH_SPACE} == paper)
        best_id = tied[0] if len(tied) == 1 else paper_id  # equal scores: the earlier trial, the paper's point
        assert p.data.params["best_trial_id"] == best_id
        score, epoch = max(history[best_id])  # the latest epoch on ties, as Ray's num_to_keep keeps it
        assert int(p.data.params["best_epoch"]) == epoch and p.data.metrics["best_select_acc"] == score
        # the registered model is that child's checkpoint of that epoch
        name, version = p.data.tags["mbib.registered_model"], p.data.tags["mbib.registered_version"]
        mv = client.get_model_version(name, version)
        assert mv.run_id == next(c.info.run_id for c in kids if c.data.tags["mbib.trial_id"] == best_id)
        model, state = model_from_checkpoint(load_registered_checkpoint(name, version, f"sqlite:///{smoke / 'mlflow.db'}"))
        assert state["model_spec"]["num_classes"] == 10
        assert int(state["epoch"]) + 1 == epoch and state["metrics"]["select_acc"] == pytest.approx(score)


def _tpe_proposals(seed, n):
    """What a seeded TPE sampler proposes after the enqueued paper point (its start-up phase samples at random)."""
    import optuna

    from mbib.study.spec import SEARCH_SPACE

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({"beta": 5.0, "a": 0.1, "b": 0.3, "m": 0.1, "gamma": 0.0})
    dists = {k: optuna.distributions.FloatDistribution(lo, hi) for k, (lo, hi) in SEARCH_SPACE.items()}
    study.ask(fixed_distributions=dists)
    return [study.ask(fixed_distributions=dists).params for _ in range(n)]


@pytest.mark.slow
@pytest.mark.timeout(1500)  # two study drivers one after the other, 4-epoch trials
def test_killed_driver_resumes_from_a_moved_folder_without_rerunning_trials(tmp_path):
    """Killed mid-trial, the study's folder (Tune state, Train checkpoints, MLflow store) moves elsewhere, as a
    committed study does to a clone on another machine; resumed there in a new Ray session, it finishes the same
    trials, none twice, every MLflow row complete, and nothing is written at the old path."""
    first, hang = tmp_path / "first", tmp_path / "hang"
    first.mkdir()
    client = _client(first)
    client.search_experiments()  # create the store's tables here: two processes creating them at once collide
    epochs = 3
    # the trials run side by side; the second to reach its first checkpoint waits there until killed, so the kill
    # lands mid-trial on any machine (polling alone lost the race on a fast one); resumed, it arrives third, goes on
    args = ("--num-samples", "2", "--max-concurrent", "2", "--epochs", str(epochs),
            "--set", f"runtime.inject_hang={hang}:2")
    no_data = {"MBIB_DATA_ROOT": None}  # the bundled digits alone: a second data set would only repeat the same path
    proc = _driver(first, *args, env=no_data)
    # kill once Tune has recorded one finished trial and the next one has reported (and checkpointed) an epoch
    while proc.poll() is None and not _in_flight_trial_dirs(first, epochs):
        time.sleep(0.5)
    assert proc.poll() is None, "the study finished before it could be killed: " + (first / "driver.log").read_text()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(hang.iterdir())) == 2  # killed while the second trial waited at its checkpoint
    finished, in_flight = _finished_trial_dirs(first), _in_flight_trial_dirs(first, epochs)
    assert finished and in_flight, "no trial was stopped part-way: " + str(_trial_states(first))
    done_at_kill = {d: _epochs_reported(d)[-1] for d in in_flight}
    lines_before = {d: (d / "result.json").read_text().count("\n") for d in finished}
    exp = client.get_experiment_by_name("t")
    ended = {r.data.tags["mbib.trial_id"]: r.info.end_time for r in client.search_runs(
        [exp.experiment_id], "attributes.status = 'FINISHED' and tags.`mbib.trial_id` != ''")}
    moved = tmp_path / "elsewhere" / "study"
    moved.parent.mkdir()
    shutil.move(first, moved)
    finished = [moved / d.relative_to(first) for d in finished]
    done_at_kill = {moved / d.relative_to(first): k for d, k in done_at_kill.items()}
    lines_before = {moved / d.relative_to(first): n for d, n in lines_before.items()}
    client = _client(moved)
    assert _driver(moved, *args, "--resume", env=no_data).wait(timeout=900) == 0, \
        (moved / "driver.log").read_text()[-3000:]
    assert not first.exists(), sorted(str(p) for p in first.rglob("*"))  # nothing went to the old path
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert all(r.info.artifact_uri.startswith(moved.as_uri() + "/") for r in runs), [r.info.artifact_uri for r in runs]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and all(p.info.status == "FINISHED" for p in parents)
    for p in parents:  # one registered version per data set, even though its parent run was reused
        name = p.data.tags["mbib.registered_model"]
        assert p.data.tags["mbib.registered_version"] == "1"
        assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
        from mbib.tracking.registry import resolve_checkpoint  # the registered checkpoint is read from the moved store
        assert resolve_checkpoint(f"models:/{name}/1", tmp_path / "dl", tracking_uri=f"sqlite:///{moved / 'mlflow.db'}").is_file()
    ids = [r.data.tags["mbib.trial_id"] for r in kids]
    assert len(ids) == len(set(ids)) == 2 * len(parents)  # 2 trials per data set, no duplicate child runs
    for d, n in lines_before.items():  # finished trials were not rerun: no new results, same MLflow record
        assert (d / "result.json").read_text().count("\n") == n
    for tid, end in ended.items():
        assert next(r for r in kids if r.data.tags["mbib.trial_id"] == tid).info.end_time == end
    for d, k in done_at_kill.items():  # the interrupted trial went on from a checkpoint: no epoch trained twice
        kid = next(r for r in kids if r.data.tags["mbib.trial_id"] in d.name)
        assert kid.info.status == "FINISHED" and kid.data.metrics["epochs_done"] == epochs
        # each epoch's report says where its process started: 0 before the kill, the checkpoint's epoch after it
        # (k epochs had been reported; a trial redone from scratch would say 0 again)
        history = {int(m.step): m.value for m in client.get_metric_history(kid.info.run_id, "started_at_epoch")}
        # Tune may register the checkpoint before result.json shows its epoch, so `k` only bounds what ran before
        # the kill; a kill before the logger logged the checkpoint epoch is made good by the trial's re-sent report
        resumed_at = int(history[epochs])
        assert resumed_at >= 1, (k, history)  # continued from a checkpoint, not redone from scratch
        assert set(history) == set(range(1, epochs + 1)), (k, history)  # every epoch in MLflow, none lost
        assert all(v == 0 for s, v in history.items() if s <= resumed_at), (k, history)  # before the kill
        assert all(v in (0, resumed_at) for s, v in history.items() if s > resumed_at), (k, history)
        # and Tune's own record of it (what the study's end reads) kept the epochs from before the kill
        assert sorted(set(_epochs_reported(d))) == list(range(1, epochs + 1)), _epochs_reported(d)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_mid_study_summarises_and_registers_nothing_and_says_how_to_resume(tmp_path):
    """Ctrl-C (SIGINT to the driver's process group) while a trial runs: Tune stops and saves its state; the study
    must not then pick a best trial from an unfinished set, register it or close the parent run."""
    hang, epochs = tmp_path / "hang", 3
    client = _client(tmp_path)
    client.search_experiments()
    proc = _driver(tmp_path, "--num-samples", "2", "--max-concurrent", "2", "--epochs", str(epochs),
                   "--set", f"runtime.inject_hang={hang}:2", env={"MBIB_DATA_ROOT": None})
    while proc.poll() is None and not _in_flight_trial_dirs(tmp_path, epochs):
        time.sleep(0.5)
    assert proc.poll() is None, "the study finished before Ctrl-C: " + (tmp_path / "driver.log").read_text()[-2000:]
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(timeout=600)
    log = (tmp_path / "driver.log").read_text()
    assert code == 130 and "stopped with 1 of 2 trials unfinished" in log and "--resume" in log, log[-3000:]
    assert "Traceback" not in log.split("stopped:")[-1]
    assert client.search_registered_models() == []
    exp = client.get_experiment_by_name("t")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert parents and all(p.info.status != "FINISHED" and "best_trial_id" not in p.data.params for p in parents)


def _trial_states(tmp_path):
    """(trial folder, status) of every trial in Tune's saved experiment states."""
    out = []
    for state in (tmp_path / "runs" / "t").glob("*/experiment_state-*.json"):
        try:
            data = json.loads(state.read_text())
        except ValueError:  # caught mid-write: the next poll reads it whole
            continue
        for trial_json, _ in data.get("trial_data", []):
            t = json.loads(trial_json)
            out.extend((d, t.get("status")) for d in state.parent.glob(f"*{t['trial_id']}*") if d.is_dir())
    return out


def _finished_trial_dirs(tmp_path):
    return [d for d, status in _trial_states(tmp_path) if status == "TERMINATED"]


def _epochs_reported(trial_dir) -> list[int]:
    path = trial_dir / "result.json"
    lines = path.read_text().splitlines() if path.is_file() else []
    out = []
    for line in lines:
        try:
            out.append(int(json.loads(line)["epochs_done"]))
        except (ValueError, KeyError):  # a line caught mid-write
            pass
    return out


def _in_flight_trial_dirs(tmp_path, epochs: int):
    """Running trials that have reported some but not all epochs, once another trial has finished."""
    states = _trial_states(tmp_path)
    if not any(status == "TERMINATED" for _, status in states):
        return []
    return [d for d, status in states if status == "RUNNING" and 1 <= (_epochs_reported(d) or [0])[-1] < epochs]


@pytest.mark.slow
def test_smoke_trials_ran_on_both_nodes_of_the_cluster(smoke):
    line = next(ln for ln in (smoke / "driver.log").read_text().splitlines() if ln.startswith("NODES "))
    client = _client(smoke)
    placed = set()
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id], max_results=1000)
    for parent in (r for r in runs if "mlflow.parentRunId" not in r.data.tags):
        study = json.loads(Path(client.download_artifacts(parent.info.run_id, "study.json", str(smoke))).read_text())
        nodes = [t["worker_nodes"] for t in study["trials"]]
        assert all(n and "," not in n for n in nodes)  # each 1-CPU trial on one node
        placed.update(nodes)
    assert placed == set(line.split()[1:])  # and the trials on both worker nodes


@pytest.mark.slow
def test_a_study_in_flight_reads_its_ended_trials_as_the_end_does_and_plots_them_on_the_parent(smoke, tmp_path):
    """While a study runs, each ended trial redraws the parent's plots from the trial folders: the rows read there
    equal the study's final rows (study.json), and a trial still running is left out."""
    from types import SimpleNamespace

    from mbib import tracking
    from mbib.study.record import MLflowTrialLogger
    from mbib.study.results import rows_so_far

    client = _client(smoke)
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("t").experiment_id], max_results=1000)
                  if "mlflow.parentRunId" not in r.data.tags)
    key = parent.data.params["dataset_key"]
    final = json.loads(Path(client.download_artifacts(parent.info.run_id, "study.json", str(tmp_path))).read_text())
    ended = [SimpleNamespace(local_path=None, path=str(d), status="TERMINATED")
             for d in (smoke / "runs" / "t" / key).glob("run_trial_*") if d.is_dir()]
    rows = rows_so_far(ended, max_epochs=3)
    assert [(r.trial_id, r.number, r.score, r.epoch, r.epochs_done, r.state) for r in rows] == sorted(
        ((t["trial_id"], t["number"], t["select_acc"], t["chosen_epoch"], t["epochs_done"], t["state"])
         for t in final["trials"]), key=lambda x: x[1])
    store = _client(tmp_path)
    exp = tracking.get_or_create_experiment(store, "in-flight")
    fresh = store.create_run(exp).info.run_id
    running = SimpleNamespace(**{**ended[1].__dict__, "status": "RUNNING"})
    drawn = MLflowTrialLogger(f"sqlite:///{tmp_path / 'mlflow.db'}", exp, fresh, key, 3).plot_so_far(
        [ended[0], running], just_ended=ended[0])
    assert [r.trial_id for r in drawn] == [rows_so_far([ended[0]], 3)[0].trial_id]
    plots = {f"plots/{n}.png" for n in ("best_so_far", "beta_curve", "ab_heatmap", "importances")}
    assert plots <= {a.path for a in store.list_artifacts(fresh, "plots")}
    # a resumed driver (its logger unpickled, even from a state saved before this existed) draws them at once
    resumed = store.create_run(exp).info.run_id
    state = MLflowTrialLogger(f"sqlite:///{tmp_path / 'mlflow.db'}", exp, resumed, key, 3).__getstate__()
    logger = MLflowTrialLogger.__new__(MLflowTrialLogger)
    logger.__setstate__({k: v for k, v in state.items() if k != "_drawn"})
    logger.on_step_begin(0, ended)
    assert plots <= {a.path for a in store.list_artifacts(resumed, "plots")}


@pytest.mark.parametrize("damage,expected", [
    ("corrupt", "is corrupt (JSONDecodeError)"), ("foreign", "belongs to another study (cifar100-lt/100.0/resnet32/mbib"),
    ("no state", "has no experiment_state"), ("fresh run over it", "already exists")])
def test_resume_over_a_corrupt_or_foreign_state_is_one_line_and_touches_nothing(tmp_path, damage, expected):
    from mbib.errors import ConfigError
    from mbib.study.cli import SMOKE_OVERRIDES
    from mbib.study.search import run_study
    from mbib.study.spec import DatasetSpec, StudySpec

    ds = DatasetSpec("digits-lt-if10", {"data.dataset": "digits-lt", "data.imbalance_factor": 10})
    spec = StudySpec(name="t", preset="cifar100-lt", datasets=[ds], overrides=dict(SMOKE_OVERRIDES), num_samples=1,
                     max_concurrent=1, storage_path=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    state = tmp_path / "runs" / "t" / ds.key
    state.mkdir(parents=True)
    (state / "tuner.pkl").write_bytes(b"\x80\x05 whatever Tune pickled")
    trial = {"trial_id": "x", "status": "TERMINATED", "config": {"train": spec.base_config(ds).to_dict()}}
    if damage == "foreign":  # another study's state under this name: CIFAR-100-LT trials
        trial["config"]["train"]["data"].update(dataset="cifar100-lt", imbalance_factor=100.0)
    if damage != "no state":
        text = json.dumps({"trial_data": [[json.dumps(trial), "{}"]]})
        (state / "experiment_state-2026.json").write_text(text[: len(text) // 2] if damage == "corrupt" else text)
    before = {p: p.read_bytes() for p in state.iterdir()}
    with pytest.raises(ConfigError) as err:
        run_study(spec, resume=damage != "fresh run over it")
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert {p: p.read_bytes() for p in state.iterdir()} == before and not (tmp_path / "mlflow.db").exists()


def test_free_port_stays_out_of_the_ephemeral_range_and_rays_worker_ports():
    from mbib.raylocal import RAY_WORKER_PORTS, _ephemeral_low, free_port

    ports = {free_port() for _ in range(20)}
    assert all(RAY_WORKER_PORTS[1] < p < _ephemeral_low() for p in ports) and len(ports) > 1


def test_dashboard_gets_ten_minutes_to_start_unless_the_environment_says(monkeypatch):
    from ray._private import ray_constants

    from mbib.raylocal import patient_dashboard_start

    monkeypatch.delenv("RAY_DASHBOARD_STARTUP_TIMEOUT_S", raising=False)
    monkeypatch.setattr(ray_constants, "RAY_DASHBOARD_STARTUP_TIMEOUT_S", 60)  # Ray's default: too short under load
    patient_dashboard_start()
    assert ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S == 600
    monkeypatch.setattr(ray_constants, "RAY_DASHBOARD_STARTUP_TIMEOUT_S", 5)
    monkeypatch.setenv("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "5")  # the user's own choice stands
    patient_dashboard_start()
    assert ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S == 5


@pytest.mark.slow
def test_ray_that_cannot_start_is_one_line(tmp_path):
    """The reported failure itself: the dashboard not up in time ("Failed to start the dashboard")."""
    script = ("from mbib.errors import TrainingError\nfrom mbib.raylocal import ensure_ray\n"
              "try:\n    ensure_ray(dashboard=True)\nexcept TrainingError as exc:\n    print('ERROR', str(exc).replace(chr(10), '<NL>'))")
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(RAY_DASHBOARD_STARTUP_TIMEOUT_S="0"),
                         capture_output=True, text=True, timeout=300)
    error = next((ln for ln in res.stdout.splitlines() if ln.startswith("ERROR ")), "")
    assert error.startswith("ERROR Ray could not start (") and "<NL>" not in error, res.stdout[-2000:] + res.stderr[-3000:]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_cluster_files_validate_against_rays_schema_and_ship_this_checkout(name):
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    text = (REPO / name).read_text()
    config = yaml.safe_load(text)
    jsonschema.validate(config, schema)
    assert "git clone" not in text and "YOUR-ORG" not in text  # the code comes from the checkout, not a URL
    assert config["file_mounts"] == {"~/mbib": "."} and ".gitignore" in config["rsync_filter"]
    assert any("pip install" in c and "-e ~/mbib" in c for c in config["setup_commands"])
    assert any("mlflow server" in c and "--host 127.0.0.1" in c for c in config["head_start_ray_commands"])
    if config["provider"]["type"] == "aws":
        assert config["docker"]["image"].startswith("rayproject/ray:") and config["docker"]["image"].endswith("-py311-gpu")
    else:  # Ray's on-premises provider: the machines and the SSH account are the user's to fill in
        assert config["provider"]["type"] == "local" and {"head_ip", "worker_ips"} <= set(config["provider"])
        assert {"ssh_user", "ssh_private_key"} <= set(config["auth"])


def test_trials_stopped_early_reach_optuna_as_pruned_not_complete():
    from optuna.trial import TrialState

    from mbib.study.results import TrialRow, best_row
    from mbib.study.search import make_searcher
    from mbib.study.spec import METRIC  # the selection split's score, which Optuna and ASHA compare

    s = make_searcher({"beta": 5.0, "a": 0.1, "b": 0.3, "m": 0.1, "gamma": 0.0}, max_epochs=10, seed=0)
    assert s.suggest("stopped") == {"beta": 5.0, "a": 0.1, "b": 0.3, "m": 0.1, "gamma": 0.0}
    s.suggest("full")
    s.on_trial_result("stopped", {METRIC: 40.0, "epochs_done": 2})
    s.on_trial_result("stopped", {"epochs_done": 3})  # a non-evaluation epoch carries no accuracy
    s.on_trial_complete("stopped", {METRIC: 40.0, "epochs_done": 3})  # ASHA stopped it at 3 of 10 epochs
    s.on_trial_result("full", {METRIC: 30.0, "epochs_done": 10})
    s.on_trial_complete("full", {METRIC: 30.0, "epochs_done": 10})
    stopped, full = s._ot_study.trials
    # PRUNED: TPE ranks it below every COMPLETE trial (Optuna keeps its last intermediate value for reference)
    assert stopped.state == TrialState.PRUNED and stopped.intermediate_values == {2: 40.0}
    assert full.state == TrialState.COMPLETE and full.value == 30.0
    rows = [TrialRow("s", 0, {}, 40.0, 3, "PRUNED", None, {}, {}), TrialRow("f", 1, {}, 30.0, 10, "COMPLETE", None, {}, {})]
    assert best_row(rows).trial_id == "f"  # a truncated score never wins over a full-budget one


def test_a_local_ray_start_that_misses_rays_node_wait_is_retried_and_other_failures_are_not(monkeypatch):
    import ray

    from mbib import raylocal
    from mbib.errors import TrainingError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    calls = []

    def init(failures):
        def fake(**kwargs):
            calls.append(kwargs["address"])
            if len(calls) <= failures:
                raise Exception(failures_text)
        return fake

    failures_text = "The current node timed out during startup. This could happen because ..."
    monkeypatch.setattr(ray, "init", init(2))
    raylocal.ensure_ray()
    assert calls == ["local"] * 3  # two slow starts, then one that came up
    calls.clear()
    monkeypatch.setattr(ray, "init", init(3))
    with pytest.raises(TrainingError, match="timed out during startup"):
        raylocal.ensure_ray()
    assert len(calls) == raylocal.START_ATTEMPTS
    calls.clear()
    failures_text = "Failed to start the GCS"
    monkeypatch.setattr(ray, "init", init(1))
    with pytest.raises(TrainingError, match="Failed to start the GCS"):
        raylocal.ensure_ray()
    assert calls == ["local"]  # another failure is not retried
