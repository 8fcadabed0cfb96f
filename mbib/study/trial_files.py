"""A resumed trial's Tune record (result.json) continues where it stopped instead of starting again.

Tune's JSON logger copies a trial's result.json back from storage only when Tune itself holds a checkpoint of the
trial. A study's trials checkpoint in Ray Train, so a resumed driver opened an empty result.json in its staging
folder and its sync then replaced the stored one with the epochs since the resume: the real CIFAR-100-LT study lost
trial 8's epochs 1-55 that way (its chosen epoch and ASHA rung scores are read from that file at the end).
progress.csv is left to Tune: its header comes from the first row a driver logs, so continuing it could misalign.
"""

from __future__ import annotations

from pathlib import Path

RESULT_FILE = "result.json"


def continue_trial_record(trial) -> bool:
    """Before Tune's loggers open it: copy the stored result.json into the trial's staging folder when the stored
    one holds more; True if copied."""
    import pyarrow.fs

    storage = getattr(trial, "storage", None)
    if storage is None or not trial.local_path:
        return False
    fs, stored = storage.storage_filesystem, Path(storage.trial_fs_path, RESULT_FILE).as_posix()
    staged = Path(trial.local_path, RESULT_FILE)
    info = fs.get_file_info(stored)
    if info.type != pyarrow.fs.FileType.File or staged.resolve().as_posix() == stored:
        return False
    if info.size <= (staged.stat().st_size if staged.is_file() else 0):
        return False  # the staging copy is current (a retry in the same driver)
    staged.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(stored, staged.as_posix(), source_filesystem=fs)
    return True
