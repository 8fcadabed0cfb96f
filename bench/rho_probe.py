"""Where rho of z is measured does not explain Table 5's gap: rho (Eq. 15-17, by shot group) of every observation,
of z after its activation (what the reports use), of z before it (the FC's output), and of each L2-normalised,
for trained checkpoints on the balanced CIFAR-100-LT test set. One thread, so it can run beside training.

    MBIB_DATA_ROOT=../shared/data python bench/rho_probe.py CHECKPOINT... > bench/results/rho_probe.txt
"""
import os
import sys

import torch

from mbib.analysis import test_set_outputs
from mbib.checkpoint import model_from_checkpoint
from mbib.config import TrainConfig, apply_overrides
from mbib.metrics import grouped_representation_ratio

torch.set_num_threads(1)  # beside a training run
cfg = apply_overrides(TrainConfig(), {"data.dataset": "cifar100-lt", "data.imbalance_factor": 100,
                                      "data.data_root": os.environ.get("MBIB_DATA_ROOT", "../shared/data")})
for path in sys.argv[1:]:
    feats, _, labels, counts, taps = test_set_outputs(path, cfg)
    model, _ = model_from_checkpoint(path)
    if model.has_z and model.neck == "none":  # z's FC reads the raw final tap: its output is z before the ReLU
        with torch.no_grad():
            feats["z_pre"] = model.z_fc[0](feats[taps[-1]])
    print(os.path.basename(path))
    for key, f in feats.items():
        groups = grouped_representation_ratio(f, labels, counts)
        normed = grouped_representation_ratio(torch.nn.functional.normalize(f, dim=1), labels, counts)["all"]["rho"]
        print(f"  {key:6s} dim {f.shape[1]:3d} zero-frac {(f == 0).float().mean():.2f}  rho "
              + " ".join(f"{g} {r['rho']:.2f}" for g, r in groups.items()) + f"   | L2-normed rho all {normed:.2f}")
