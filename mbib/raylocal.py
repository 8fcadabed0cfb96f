"""Joining or starting Ray for a driver: the cluster RAY_ADDRESS names, else a fresh local instance."""

from __future__ import annotations

import os
import random
import socket

import ray

from mbib.errors import TrainingError

# Ray waits 60 s for its dashboard by default; on a loaded machine (two trainings running) its start-up imports
# alone take longer, and ray.init dies with "Failed to start the dashboard" and an empty dashboard log.
DASHBOARD_START_TIMEOUT_S = 600
RAY_WORKER_PORTS = (10002, 19999)  # Ray's default min/max_worker_port: never hand these out


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS and Windows use 49152 and up


def free_port() -> int:
    """A free TCP port below the ephemeral range (and above Ray's worker ports).

    Ports from bind(0) are ephemeral: between our pick and the server's bind, any process's bind(0) or outgoing
    connection can be handed the same port. Below the ephemeral range only explicit pickers like this one compete.
    """
    low, high = RAY_WORKER_PORTS[1] + 1, _ephemeral_low() - 1
    candidates = random.sample(range(low, high), min(200, high - low)) if high - low > 100 else []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # an unusual port range configuration: let the OS choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def patient_dashboard_start() -> None:
    """Let ray.init wait DASHBOARD_START_TIMEOUT_S for the dashboard, unless RAY_DASHBOARD_STARTUP_TIMEOUT_S says."""
    if "RAY_DASHBOARD_STARTUP_TIMEOUT_S" not in os.environ:
        from ray._private import ray_constants  # read by ray.init at call time, set from the environment at import

        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = max(ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S,
                                                            DASHBOARD_START_TIMEOUT_S)


def send_cluster_token() -> None:
    """Joining a running cluster: Ray 2.60's `ray start --head` turns token authentication on when a token exists
    (~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH), but a driver that joins it sends none unless
    RAY_AUTH_MODE=token, and is refused ("InvalidAuthToken"). Send it then; RAY_AUTH_MODE set by the user stays."""
    from pathlib import Path

    has_token = any(os.environ.get(v) for v in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")) or \
        (Path.home() / ".ray" / "auth_token").is_file()
    if not has_token or "RAY_AUTH_MODE" in os.environ:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray read its config when imported: its own helper re-reads it (a Ray without token auth lacks it)
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:
        return
    _enable_token_auth()


START_ATTEMPTS = 3  # local starts, when the new node's raylet was too slow to register
SLOW_NODE = "timed out during startup"  # Ray's words for that (ray._private.node, a fixed 30 s)


def ensure_ray(dashboard: bool = False) -> None:
    """Join RAY_ADDRESS's cluster, else start a fresh local Ray (never a stale `ray start` left on the machine).

    ``dashboard=True`` (studies) also starts the dashboard and points RAY_API_SERVER_ADDRESS at it: Tune kills
    the actor of a trial ASHA stops, and its Train workers' placement group is then freed only by Train's
    cleaner, which asks the dashboard's state API whether the controller died; without it the CPUs would stay
    reserved and later trials would wait forever. When Ray cannot start, one TrainingError line says why.
    """
    if ray.is_initialized():
        return
    patient_dashboard_start()
    api, kwargs = os.environ.get("RAY_API_SERVER_ADDRESS"), {}
    if os.environ.get("RAY_ADDRESS"):
        send_cluster_token()
    else:
        kwargs = {"address": "local"}
        if dashboard:
            port = free_port()
            api = api or f"http://127.0.0.1:{port}"
            kwargs.update(include_dashboard=True, dashboard_port=port)
        else:  # a training alone has no use for it, and on a small machine its processes take CPU from training
            kwargs.update(include_dashboard=False)
    runtime_env = {"env_vars": {"RAY_API_SERVER_ADDRESS": api}} if api else None
    from mbib.console import filter_worker_logs

    filter_worker_logs()  # worker logs only with --verbose (progress bars always)
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                ray.init(configure_logging=False, log_to_driver=True, runtime_env=runtime_env, **kwargs)
                break
            except Exception as exc:
                # a loaded machine can miss Ray's fixed 30 s wait for a new node's raylet: a fresh start, again
                if "address" not in kwargs or attempt == START_ATTEMPTS or SLOW_NODE not in str(exc):
                    raise
                ray.shutdown()
    except Exception as exc:  # Ray raises bare Exceptions (with log excerpts) when a component fails to start
        ray.shutdown()
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        where = f"join RAY_ADDRESS={os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS") else "start"
        raise TrainingError(f"Ray could not {where} ({type(exc).__name__}: {first[:200]}): check `ray status` and "
                            "free memory, wait for other jobs on this machine, or set RAY_ADDRESS to a running "
                            "cluster") from None
