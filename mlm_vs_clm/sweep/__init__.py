"""Sweeps: a grid of pretraining (and fine-tuning) runs -> results table -> scaling-law fits -> plots.

plan.py (the grid and its runs), runner.py (run, collect, resume), slurm.py (the SLURM
backend), results.py (tables), analysis.py (winners, frontiers), scaling_law.py (fits);
the command is __main__.py: `python -m mlm_vs_clm.sweep --config=configs/sweeps/NAME.py --workdir=DIR`.
"""
