"""iNaturalist 2018 study (ResNet-50, 90 epochs, the paper's gamma=0.5 as the first point); needs the iNat file lists.

    python studies/inat2018.py --data-root /data/inat2018 --storage-path s3://bucket/mbib
"""

import sys

from mbib.study.cli import study_main
from mbib.study.spec import DatasetSpec

DATASETS = [DatasetSpec("inat2018", {"data.dataset": "inat2018"})]

if __name__ == "__main__":
    sys.exit(study_main(sys.argv[1:], prog="studies/inat2018.py", name="inat2018-mbib", preset_name="inat2018",
                        datasets=DATASETS, num_samples=12, max_concurrent=4, gpus_per_trial=1.0))
