"""MLflow clients that wait out a locked SQLite store: a second writer on the same file must not kill a study."""

from __future__ import annotations

import time
from typing import Any

from mbib.errors import TrainingError

LOCK_WAIT_S = 600.0  # MLflow's own SQLite busy timeout is 20 s per statement; a study waits this long in all


def is_locked(exc: BaseException) -> bool:
    text = str(exc)
    return "database is locked" in text or "database table is locked" in text


class LockPatientClient:
    """Wraps an MlflowClient: a call that fails on SQLite's lock is retried (SQLite rolled it back) until
    `wait_s` has passed, then one TrainingError line. `retries` counts the waits (what the tests check)."""

    def __init__(self, client: Any, wait_s: float = LOCK_WAIT_S):
        self._client, self._wait_s, self.retries = client, wait_s, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            deadline, delay = time.monotonic() + self._wait_s, 0.5
            while True:
                try:
                    return attr(*args, **kwargs)
                except Exception as exc:
                    if not is_locked(exc):
                        raise
                    if time.monotonic() + delay > deadline:
                        raise TrainingError(f"the MLflow store {getattr(self._client, 'tracking_uri', '')} stayed locked by another "
                                            f"writer for {self._wait_s:.0f} s: give each study its own store "
                                            "(--tracking-uri) or run an MLflow server") from None
                    self.retries += 1
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)

        return call
