"""Shared fixtures: one real local Ray for the whole session (starting Ray costs seconds), one exported model."""

import os

import pytest


# Ray Train's controller polls its workers every 2 s by default, which tiny test runs would spend waiting; the
# in-process Ray and every driver a test starts inherit this (no effect on what is trained or recorded)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")

END_TO_END = {"ray_local", "exported"}  # a test using one of these is end to end: marked slow wherever it is
SERVING = "exported"  # the tests of the exported model, Serve's among them: one worker, so one export and one HAProxy
if os.environ.get("PYTEST_XDIST_WORKER"):  # two test processes share the cores: one thread each, no oversubscription
    import torch

    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads xdist_group marks into node ids: later is too late
def pytest_collection_modifyitems(items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if END_TO_END & names:
            item.add_marker(pytest.mark.slow)
        if SERVING in names or item.path.name == "test_serve.py":  # HAProxy's stats port is fixed: two Serves collide
            item.add_marker(pytest.mark.xdist_group("serving"))  # the other end-to-end tests, mostly waiting, spread


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    import ray

    if not ray.is_initialized():
        from mbib.ingress import prepare_ingress

        prepare_ingress()  # the Serve tests run under the product's default ingress (RAY_SERVE_ENABLE_HA_PROXY=0: Ray's proxy)
        # 4 logical CPUs on a 2-core machine: two Train workers plus the Tune/Serve actors around them fit
        # test modules define callbacks and actors that Ray's processes must import by module name
        path = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
        ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}}, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


@pytest.fixture
def data_root():
    root = os.environ.get("MBIB_DATA_ROOT")
    if not root or not os.path.exists(os.path.join(root, "mnist10k.npz")):
        pytest.skip("MBIB_DATA_ROOT with mnist10k.npz not set")
    return root


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Train, register the checkpoint in a local MLflow registry, export from models:/tiny/1 and log to MLflow: the
    model test_export.py checks and test_serve.py serves (one export, the slow part, for both)."""
    import mlflow

    from mbib.export import export_onnx
    from serving_helpers import train_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("export")
    ckpt = train_tiny_checkpoint(tmp / "run")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("train", artifact_location=str(tmp / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(ckpt), artifact_path="checkpoint")
    client = mlflow.MlflowClient()
    client.create_registered_model("tiny")
    client.create_model_version("tiny", source=f"{run.info.artifact_uri}/checkpoint", run_id=run.info.run_id)
    mlflow.create_experiment("export", artifact_location=str(tmp / "export-artifacts"))  # not ./mlruns in the cwd
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MBIB_DATA_ROOT", raising=False)  # parity images come from the checkpoint's bundled data set
        report = export_onnx("models:/tiny/1", tmp / "model.onnx", parity_count=24, mlflow_tracking_uri=uri,
                             mlflow_experiment="export")
    return {"report": report, "onnx": tmp / "model.onnx", "ckpt": ckpt, "tmp": tmp, "uri": uri}
