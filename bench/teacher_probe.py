"""What MBIB's shallow teachers teach z: per head (each tap v_i, z) on the balanced CIFAR-100-LT test set, its
accuracy, the mean entropy of its prediction (nats; uniform over 100 classes is 4.61), its mean probability on the
true class (the positive posterior, Eq. 14) and, for each teacher, KL(q(y|v_i) || q(y|z)) (Eq. 13, gamma 0: T = 1,
raw logits as trained). One thread, so it can run beside training.

    MBIB_DATA_ROOT=../shared/data python bench/teacher_probe.py CHECKPOINT... > bench/results/teacher_probe.txt
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

from mbib.analysis import test_set_outputs
from mbib.config import TrainConfig, apply_overrides

torch.set_num_threads(1)  # beside a training run
cfg = apply_overrides(TrainConfig(), {"data.dataset": "cifar100-lt", "data.imbalance_factor": 100,
                                      "data.data_root": os.environ.get("MBIB_DATA_ROOT", "../shared/data")})
print(f"uniform entropy {math.log(100):.2f} nats")
for path in sys.argv[1:]:
    with torch.no_grad():
        _, logits, labels, _, taps = test_set_outputs(path, cfg)
        print(os.path.basename(path))
        for key, out in logits.items():
            logp = F.log_softmax(out, dim=1)
            p = logp.exp()
            line = (f"  {key:3s} acc {100 * (out.argmax(1) == labels).float().mean():5.1f}  entropy "
                    f"{-(p * logp).sum(1).mean():.2f}  max-prob {p.max(1).values.mean():.3f}  "
                    f"p(true) {p.gather(1, labels[:, None]).mean():.3f}")
            if key in taps and "z" in logits:  # the teacher's pull on z: KL(q(y|v_i) || q(y|z)), Eq. 13
                kl = (p * (logp - F.log_softmax(logits["z"], dim=1))).sum(1).mean()
                line += f"  KL(q(y|{key}) || q(y|z)) {kl:.3f}"
            print(line, flush=True)
