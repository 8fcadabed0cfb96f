"""Joining or starting Ray for a driver: the cluster RAY_ADDRESS names, else a fresh local instance."""

from __future__ import annotations

import os
import socket

import ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_ray(dashboard: bool = False) -> None:
    """Join RAY_ADDRESS's cluster, else start a fresh local Ray (never a stale `ray start` left on the machine).

    ``dashboard=True`` (studies) also starts the dashboard and points RAY_API_SERVER_ADDRESS at it: Tune kills
    the actor of a trial ASHA stops, and its Train workers' placement group is then freed only by Train's
    cleaner, which asks the dashboard's state API whether the controller died; without it the CPUs would stay
    reserved and later trials would wait forever.
    """
    if ray.is_initialized():
        return
    api, kwargs = os.environ.get("RAY_API_SERVER_ADDRESS"), {}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs = {"address": "local"}
        if dashboard:
            port = free_port()
            api = api or f"http://127.0.0.1:{port}"
            kwargs.update(include_dashboard=True, dashboard_port=port)
    runtime_env = {"env_vars": {"RAY_API_SERVER_ADDRESS": api}} if api else None
    from mbib.console import filter_worker_logs

    filter_worker_logs()  # worker logs only with --verbose (progress bars always)
    ray.init(configure_logging=False, log_to_driver=True, runtime_env=runtime_env, **kwargs)
