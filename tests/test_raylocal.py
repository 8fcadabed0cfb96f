"""Joining a running Ray cluster: the driver sends the cluster's token when one is on disk."""

import os

from mbib.raylocal import send_cluster_token


def test_a_driver_joining_a_cluster_sends_the_token_ray_start_enabled(monkeypatch, tmp_path):
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    send_cluster_token()
    assert "RAY_AUTH_MODE" not in os.environ  # no token anywhere: nothing to send
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 64)  # what `ray start --head` leaves (or finds) there
    send_cluster_token()
    assert os.environ["RAY_AUTH_MODE"] == "token"  # without it Ray 2.60 refuses the driver: InvalidAuthToken
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    send_cluster_token()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"  # the user's choice stays
