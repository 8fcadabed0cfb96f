"""ImageNet-LT study (ResNet-10, 90 epochs, the paper's gamma=0.5 as the first point); needs the ImageNet-LT file lists.

    python studies/imagenet_lt.py --data-root /data/imagenet --storage-path s3://bucket/mbib
"""

import sys

from mbib.study.cli import study_main
from mbib.study.spec import DatasetSpec

DATASETS = [DatasetSpec("imagenet-lt", {"data.dataset": "imagenet-lt"})]

if __name__ == "__main__":
    sys.exit(study_main(sys.argv[1:], prog="studies/imagenet_lt.py", name="imagenet-lt-mbib", preset_name="imagenet-lt",
                        datasets=DATASETS, num_samples=16, max_concurrent=4, gpus_per_trial=1.0))
