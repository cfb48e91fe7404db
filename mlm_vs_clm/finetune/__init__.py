"""Fine-tuning evaluation: task heads, task suites (news, paper), the LR x seed grid, reports.

`python -m mlm_vs_clm.finetune --config=configs/finetune.py:news_quick --config.checkpoint=RUN --workdir=DIR`;
docs/finetune.md describes the suites, the knobs and the output files.
"""
