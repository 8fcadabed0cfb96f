"""A second writer holding the SQLite MLflow store longer than MLflow's 20 s busy timeout: we wait, not die."""

import sqlite3
import threading

from mlflow.tracking import MlflowClient

from mbib import tracking
from mbib.storelock import LockPatientClient


def test_a_locked_sqlite_store_is_waited_out(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = LockPatientClient(MlflowClient(uri))
    client.search_experiments()  # the tables exist before the other writer locks the file
    other = sqlite3.connect(tmp_path / "mlflow.db", check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")  # another study in the middle of a long write
    locked = threading.Event()

    def release_after_first_refusal():
        while not client.retries:  # released once our call has failed on the lock once (MLflow waited 20 s)
            if locked.wait(0.2):
                return
        other.rollback()

    thread = threading.Thread(target=release_after_first_refusal)
    thread.start()
    try:
        experiment_id = tracking.get_or_create_experiment(client, "waits")
    finally:
        locked.set()
        thread.join()
        other.close()
    assert client.retries >= 1 and MlflowClient(uri).get_experiment(experiment_id).name == "waits"
