"""Rerun the paper's Table 1 grid (and the Section 4.4-4.6 analyses) and write bench/results/reproduction-*.md.

    python bench/reproduce.py --epochs 200                      # the paper's CIFAR-100-LT grid
    python bench/reproduce.py --dataset mnist-lt --methods ce,bsce,bib,mbib --ifs 100,10 --epochs 8

See `python bench/reproduce.py --help`; the logic lives in mbib.reproduction.
"""

import sys

from mbib.reproduction.cli import main

if __name__ == "__main__":
    sys.exit(main())
