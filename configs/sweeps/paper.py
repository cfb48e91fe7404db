"""The study's grid (PAPER.md), for a cluster: `python -m mlm_vs_clm.sweep
--config=configs/sweeps/paper.py --workdir=DIR --backend=slurm --sbatch_args='--nodes=24 ...'`
(or `--backend=print` for another scheduler). 36 pretraining runs; with the two continued-
pretraining runs (docs/sweeps.md) that makes the study's 38 models.

What PAPER.md gives: 38 models in all, 210M to 1B; budgets 12k / 22k / 42k steps; masking ratios
20 / 30 / 40 / 50 % tried; biphasic splits 100 % MLM, 75/25, 50/50, 25/75 CLM/MLM, 100 % CLM at
each budget, at MLM-40; names `210m-mlm40-42k`, `610m-clm-21k-mlm40-42k`,
`610m-clm-10k-mlm40-42k`, and two CPT models, `610m-clm-dec42k-mlm40-54k` and
`610m-mlm40-dec42k-mlm40-54k`. It does not list the grid. Our reading, block by block:

  1. MLM-40 vs CLM at every size and budget (findings 1 and 2):
     3 sizes x 3 budgets x 2                                                    18 runs
  2. masking ratio at every size, at 42k: 3 sizes x {20, 30, 40, 50 %} = 12, of which
     MLM-40 is in block 1                                                        9 new
  3. biphasic at 610m (every biphasic name we know is 610m), at each budget: 100 % MLM,
     25/75, 50/50, 75/25 CLM/MLM, 100 % CLM = 15, of which the two ends are in block 1
                                                                                 9 new
  sweep: 36 runs (9 branch from the 610m CLM run of their budget)
  4. CPT: MLM-40 for 12k steps from the decayed 42k 610m CLM and MLM-40 runs: 2 runs
     outside the sweep (init_from, not a branch: docs/sweeps.md gives the commands)
  in all: 18 + 9 + 9 + 2 = 38 models, the study's count.

Which sizes carry the mask-ratio and biphasic blocks, and that the masking ratios are swept at
42k only, is our reading, chosen so that the count is 38; PAPER.md does not say.

Switch steps are whole thousands, as in the study's names (`clmNk_mlm40`, schedules.py): 10k and
21k of 42k are the study's (`clm-10k`, `clm-21k`); the others are our choice, by one rule:
the 50/50 switch is exact, the 25/75 one rounds the quarter down to a whole thousand (10.5k ->
10k, as the study did), and the 75/25 one is the budget minus that, so the two swap phase
lengths: 12k -> 3k / 6k / 9k, 22k -> 5k / 11k / 17k, 42k -> 10k / 21k / 32k. `paper_cross.py`
is the full cross (153 runs, fractional switches). Each final checkpoint is fine-tuned on the
paper suite (configs/finetune.py:paper: 6 learning rates x 5 seeds per task).
"""

import ml_collections

SIZES = ("210m", "610m", "1b")
BUDGETS = (12000, 22000, 42000)
# CLM steps, in thousands, before the switch to MLM-40: 25/75, 50/50 and 75/25 CLM/MLM.
SWITCHES_K = {12000: (3, 6, 9), 22000: (5, 11, 17), 42000: (10, 21, 32)}


def get_config():
    c = ml_collections.ConfigDict()
    c.base = "configs/pretrain.py"
    c.blocks = (
        # 1. MLM-40 vs CLM at every size and budget.
        dict(sizes=SIZES, steps=BUDGETS, schedules=("mlm40", "clm")),
        # 2. Masking ratio at every size, at the longest budget.
        dict(sizes=SIZES, steps=(42000,), schedules=("mlm20", "mlm30", "mlm40", "mlm50")),
        # 3. Biphasic splits at 610m, one block per budget (the switch steps differ).
        *(dict(sizes=("610m",), steps=(b,),
               schedules=("mlm40", *(f"clm{k}k_mlm40" for k in SWITCHES_K[b]), "clm")) for b in BUDGETS),
    )
    c.seeds = (0,)  # every block's seeds (a block may set its own)
    c.keep_fractions = ()  # e.g. (0.25, 0.5, 0.75): intermediate checkpoints of every run
    c.branch = "resume"  # biphasic runs continue from the CLM run's checkpoint at the switch
    # Every run sees the same ordered token stream (the controlled comparison of the study):
    # set data.source to your tokenized FineWeb-Edu copy, e.g. "data.source=/data/fineweb-edu/*.parquet".
    c.overrides = ()
    c.finetune = ml_collections.ConfigDict(dict(config="configs/finetune.py:paper", overrides=()))
    return c
