"""Hyperparameter studies: Ray Tune trials that each fit a Ray Train run, searched by Optuna, logged to MLflow.

One study = one MLflow experiment; per data set one Tune experiment, one parent MLflow run and one nested child
run per trial. Only the driver writes to MLflow (SQLite allows one writer; `mbib.study.record`). ASHA stops
weak trials early; the searcher tells Optuna those trials are PRUNED so TPE never mistakes a truncated accuracy
for a final one.

spec: what a study runs (search space, data sets, base config); search: the trials, searcher and scheduler;
results: trial rows, best trial and importances; cli: the flags shared by studies/*.py.
"""
