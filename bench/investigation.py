"""The CIFAR-100-LT investigation (seeds, beta, shallow teachers, Table 9, the neck): trains the missing cells of
each run in order, resumable, and writes bench/results/investigation-cifar100-lt-200ep.md.

    MBIB_DATA_ROOT=../shared/data python bench/investigation.py [--runs seeds,beta] [--jobs N] [--report-only]
"""

import sys

from mbib.reproduction.investigation import main

if __name__ == "__main__":
    sys.exit(main())
