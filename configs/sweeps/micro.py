"""The micro sweep: `python -m mlm_vs_clm.sweep --config=configs/sweeps/micro.py --workdir=DIR`.

Three widths of the `tiny` preset x two step budgets x pure MLM, pure CLM and CLM-then-MLM
at 25/50/75 % CLM, one seed, on the demo corpus; each final checkpoint is fine-tuned on the
news `topic` task. Sized for 2 CPU cores (see README for the measured time); the tests run
a reduced form of it. Any key can be overridden: `--config.steps=(50,)`.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.base = "configs/pretrain.py"
    c.sizes = (
        "d32=tiny:model.hidden_size=32,model.ffn_size=96",
        "d64=tiny",
        "d128=tiny:model.hidden_size=128,model.ffn_size=384",
    )
    c.steps = (100, 250)
    c.schedules = ("mlm40", "clm", "clm25_mlm40", "clm50_mlm40", "clm75_mlm40")
    c.seeds = (0,)
    c.keep_fractions = ()  # e.g. (0.25, 0.5, 0.75): intermediate checkpoints of every run
    c.branch = "resume"  # biphasic runs continue from the CLM run's checkpoint at the switch
    c.overrides = ("train.eval_every=50", "train.checkpoint_every=50", "train.eval_batches=4")
    c.finetune = ml_collections.ConfigDict(
        dict(
            config="configs/finetune.py:news_quick",
            overrides=("tasks=topic", "seeds=(0,)", "steps=60", "eval_every=30"),
        )
    )
    return c
