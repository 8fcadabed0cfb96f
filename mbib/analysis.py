"""The analyses of a trained model on its balanced test set (Sections 4.4-4.6): accuracy and prediction share of
every head, rho (Table 5) of the final observation and of z, the mean positive posterior (Appendix D)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mbib.config import TrainConfig


@torch.no_grad()
def test_set_outputs(checkpoint: str, cfg: TrainConfig, batch_size: int = 500):
    """The checkpoint's model on the balanced test set of cfg: (features, logits, labels, class_counts, taps)."""
    from mbib.checkpoint import model_from_checkpoint
    from mbib.data import normalize
    from mbib.train.engine import load_data

    model, _ = model_from_checkpoint(checkpoint)
    data = load_data(cfg)
    feats: dict[str, list[torch.Tensor]] = {}
    logits: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(data.y_test), batch_size):
        x = normalize(data.x_test[start:start + batch_size], data.mean, data.std)
        for store, out in ((feats, model.features(x)), (logits, model(x))):
            for k, v in out.items():
                store.setdefault(k, []).append(v.float())
    cat = lambda d: {k: torch.cat(v) for k, v in d.items()}  # noqa: E731
    return cat(feats), cat(logits), data.y_test, list(data.class_counts), model.tap_keys


def checkpoint_analysis(checkpoint: str | Path, cfg: TrainConfig) -> dict[str, Any]:
    """Everything the reproduction's report needs from a final model (computed once, kept in its state): per
    head (each tap, z and their mean "f+g", the prediction) its accuracy and the share of predictions on each
    shot group; rho (Table 5, Eq. 15-17) of the final observation v and of z; the mean positive
    posterior per class of the prediction (Appendix D, Eq. 14)."""
    from mbib.metrics import grouped_representation_ratio, mean_positive_posterior, prediction_share, shot_groups
    from mbib.models import ensemble_logits

    feats, logits, labels, counts, tap_keys = test_set_outputs(str(checkpoint), cfg)
    heads = {**logits, "f+g": ensemble_logits(logits)}
    out: dict[str, Any] = {"heads": {h: {"acc": 100.0 * (v.argmax(1) == labels).float().mean().item(),
                                         "share": prediction_share(v, counts)} for h, v in heads.items()},
                           "balanced_share": {g: 100.0 * m.float().mean().item() for g, m in shot_groups(counts).items()}}
    wanted = {"v": tap_keys[-1]} if tap_keys else {}
    if "z" in feats:
        wanted["z"] = "z"
    out["rho"] = {name: {g: r["rho"] for g, r in grouped_representation_ratio(feats[key], labels, counts).items()}
                  for name, key in wanted.items()}
    out["posterior"] = mean_positive_posterior(heads["f+g"].softmax(dim=1), labels, len(counts)).tolist()
    return out
