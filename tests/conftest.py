"""Shared fixtures: one real local Ray for the whole session (starting Ray costs seconds)."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    import ray

    if not ray.is_initialized():
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
