"""The full cross of the study's axes (not the study's grid, which is `paper.py`):
`python -m mlm_vs_clm.sweep --config=configs/sweeps/paper_cross.py --workdir=DIR --backend=slurm
--sbatch_args='--nodes=24 ...'` (or `--backend=print` for another scheduler).

210m / 610m / 1b x 12k / 22k / 42k steps x {100 % MLM, 75/25, 50/50, 25/75 CLM/MLM, 100 % CLM}
x masking 20 / 30 / 40 / 50 %: 9 budgets x 17 schedules = 153 runs, of which 108 biphasic runs
branch from the pure CLM run of their budget. The splits are fractions of the budget
(`clm25_mlm40` switches at 10,500 steps of 42k), where `paper.py` uses the study's round
numbers (`clm10k_mlm40`). Each final checkpoint is fine-tuned on the paper suite
(configs/finetune.py:paper: 6 learning rates x 5 seeds per task).
"""

import ml_collections

MASKS = (20, 30, 40, 50)
CLM_SPLITS = (25, 50, 75)


def get_config():
    c = ml_collections.ConfigDict()
    c.base = "configs/pretrain.py"
    c.sizes = ("210m", "610m", "1b")
    c.steps = (12000, 22000, 42000)
    c.schedules = (
        tuple(f"mlm{m}" for m in MASKS)
        + ("clm",)
        + tuple(f"clm{s}_mlm{m}" for s in CLM_SPLITS for m in MASKS)
    )
    c.seeds = (0,)
    c.keep_fractions = ()  # e.g. (0.25, 0.5, 0.75): intermediate checkpoints of every run
    c.branch = "resume"
    # Every run sees the same ordered token stream (the controlled comparison of the study):
    # set data.source to your tokenized FineWeb-Edu copy, e.g. "data.source=/data/fineweb-edu/*.parquet".
    c.overrides = ()
    c.finetune = ml_collections.ConfigDict(dict(config="configs/finetune.py:paper", overrides=()))
    return c
