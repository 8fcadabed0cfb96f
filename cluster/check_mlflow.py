"""What a finished study left on an MLflow server: parent and child runs, plots, dataset inputs, registered models.

    python cluster/check_mlflow.py http://127.0.0.1:5000 digits-lt-mbib-smoke    # exit 1 when something is missing
"""

import sys

from mlflow.tracking import MlflowClient

PLOTS = {f"plots/{n}.png" for n in ("best_so_far", "beta_curve", "ab_heatmap", "importances")}


def check(uri: str, experiment: str) -> list[str]:
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return [f"no experiment {experiment!r} on {uri}"]
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    problems = [] if parents else ["no parent run"]
    print(f"  experiment {experiment} ({exp.tags.get('mlflow.experimentKind')}): {len(parents)} parent runs, "
          f"{len(runs) - len(parents)} child runs")
    for p in parents:
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        plots = {a.path for a in client.list_artifacts(p.info.run_id, "plots")}
        name, version = p.data.tags.get("mbib.registered_model"), p.data.tags.get("mbib.registered_version")
        mv = client.get_model_version(name, version) if name and version else None
        files = [a.path for a in client.list_artifacts(mv.run_id, "model")] if mv else []
        datasets = [d.dataset.name for d in p.inputs.dataset_inputs]
        print(f"  {p.info.run_name}: {len(kids)} trials ({sum(k.info.status == 'FINISHED' for k in kids)} finished), "
              f"best_acc {p.data.metrics.get('best_acc', float('nan')):.1f}, plots {len(plots & PLOTS)}/4, "
              f"dataset {datasets}, model models:/{name}/{version} -> {files}")
        problems += [f"{p.info.run_name}: {what}" for what, bad in (
            ("no child runs", not kids), ("plots missing", not PLOTS <= plots), ("no best_acc", "best_acc" not in p.data.metrics),
            ("no registered model", mv is None or "model/checkpoint.pt" not in files), ("no dataset input", not datasets))
            if bad]
    return problems


if __name__ == "__main__":
    problems = check(*sys.argv[1:3])
    for line in problems:
        print(f"  MISSING: {line}")
    sys.exit(1 if problems else 0)
