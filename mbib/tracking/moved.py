"""A SQLite MLflow store moved to another folder (a study committed on one machine, resumed from a clone on another)
keeps working: the artifact paths MLflow wrote into it, absolute, are pointed at the artifacts beside it now."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlparse

from mbib.tracking import ARTIFACTS_DIR  # where get_or_create_experiment keeps a SQLite store's artifacts
# every column where MLflow 3 writes an artifact location of a run, an experiment, a logged or registered model
PATH_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
                ("model_versions", "source"), ("model_versions", "storage_location"))


def _local(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def follow_moved_store(uri: str) -> int:
    """Point a moved SQLite store's artifact paths at the `mlartifacts/` folder beside it; returns the rows changed.

    An experiment is rewritten only when its artifacts were kept in an `mlartifacts/` folder beside the store that
    wrote them and that folder is gone (the store moved) or the same experiment folder is beside the store now (it
    was copied), so a store whose artifacts live elsewhere on purpose is left as it is."""
    if not uri.startswith("sqlite:///"):
        return 0
    db = Path(uri[len("sqlite:///"):])
    here = db.parent.resolve() / ARTIFACTS_DIR
    if not db.is_file():
        return 0
    changed = 0
    with sqlite3.connect(db, timeout=60) as con:
        tables = {t for (t,) in con.execute("select name from sqlite_master where type='table'")}
        if "experiments" not in tables:
            return 0
        old_roots = set()
        for (loc,) in con.execute("select artifact_location from experiments where artifact_location like 'file://%'"):
            path = _local(loc)
            moved = not path.parent.exists() or (here / path.name).is_dir()
            if path.parent.name == ARTIFACTS_DIR and path.parent != here and moved:
                old_roots.add(path.parent.as_uri())
        for old in sorted(old_roots):
            for table, column in PATH_COLUMNS:
                if table not in tables:
                    continue
                cur = con.execute(f"update {table} set {column} = ? || substr({column}, ?) "  # noqa: S608 (fixed names)
                                  f"where substr({column}, 1, ?) = ?",
                                  (here.as_uri(), len(old) + 1, len(old) + 1, old + "/"))
                changed += cur.rowcount
    if changed:
        _forget_artifact_repos()
    return changed


def _forget_artifact_repos() -> None:
    """MLflow caches each run's artifact location per process: one written here before the move must not be reused."""
    try:
        from mlflow.tracking._tracking_service import utils
    except ImportError:  # a release without the cache
        return
    getattr(utils, "_artifact_repos_cache", {}).clear()
