"""Where rho of z is measured does not explain Table 5's gap: rho (Eq. 15-17, by shot group) of every observation,
of z after its activation (what the reports use), of z before it (the FC's output), and of each L2-normalised,
for trained checkpoints on the balanced CIFAR-100-LT test set. One thread, so it can run beside training.

    MBIB_DATA_ROOT=../shared/data python bench/rho_probe.py CHECKPOINT... > bench/results/rho_probe.txt
"""
import os
import sys

import torch

from mbib.config import TrainConfig, apply_overrides
from mbib.checkpoint import model_from_checkpoint
from mbib.data import normalize
from mbib.train.engine import load_data
from mbib.metrics import grouped_representation_ratio

torch.set_num_threads(1)  # beside a training run
cfg = apply_overrides(TrainConfig(), {"data.dataset": "cifar100-lt", "data.imbalance_factor": 100, "data.data_root": os.environ.get("MBIB_DATA_ROOT", "../shared/data")})
data = load_data(cfg)
counts = list(data.class_counts)
for path in sys.argv[1:]:
    model, _ = model_from_checkpoint(path)
    store = {}
    if model.has_z:
        model.z_fc[0].register_forward_hook(lambda m, i, o: store.setdefault("z_pre", []).append(o.float()))
    feats = {}
    with torch.no_grad():
        for s in range(0, len(data.y_test), 500):
            x = normalize(data.x_test[s:s+500], data.mean, data.std)
            for k, v in model.features(x).items():
                feats.setdefault(k, []).append(v.float())
    feats = {k: torch.cat(v) for k, v in feats.items()}
    if store: feats["z_pre"] = torch.cat(store["z_pre"])
    print(os.path.basename(path))
    for k, f in feats.items():
        r = grouped_representation_ratio(f, data.y_test, counts)
        rn = grouped_representation_ratio(torch.nn.functional.normalize(f, dim=1), data.y_test, counts)
        print(f"  {k:6s} dim {f.shape[1]:3d} zero-frac {(f == 0).float().mean():.2f}  rho " + " ".join(f"{g} {v['rho']:.2f}" for g, v in r.items()) + "   | L2-normed rho all %.2f" % rn["all"]["rho"])
