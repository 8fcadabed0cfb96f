"""Reproduction of the paper's CIFAR-100-LT results (Table 1, 4, 5; Figure 3; Appendix D) as one resumable command.

Every cell (one method at one IF, or one ablation setting) trains through `run_training` and is recorded in a
JSON state file next to the report as soon as it finishes, so a rerun skips finished cells. The report is
rebuilt from the state file on every run; text between the notes markers of an existing report is kept.

grid: the cells and their configs; state: the JSON record; run: training and analysing cells; report: the paper's
numbers and the Markdown report; cli: the command line (`bench/reproduce.py`). The analyses are `mbib.analysis`.
"""
