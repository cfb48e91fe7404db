"""`python -m mlm_vs_clm.demo`: the demo behind `make demo` (see mlm_vs_clm/demo/__init__.py)."""

from __future__ import annotations

import json
import os
import shutil
import time

from absl import app, flags

from mlm_vs_clm.config import flags_parser
from mlm_vs_clm.demo import describe_schedule, hf_loader, run_stage

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "demo_runs", "Where the demo writes its runs.")
flags.DEFINE_integer("steps", 200, "Pretraining steps of the tiny model.")
flags.DEFINE_string("objective", "clm50_mlm40", "Objective schedule of the pretraining run.")


def main(argv) -> None:
    del argv
    start = time.time()
    workdir = os.path.abspath(FLAGS.workdir)
    run_dir = os.path.join(workdir, f"pretrain_tiny_{FLAGS.objective}")
    ft_dir = os.path.join(workdir, "finetune_news_quick")
    hf_dir = os.path.join(workdir, "hf_export")

    run_stage(["mlm_vs_clm.train", f"--config=configs/pretrain.py:tiny,{FLAGS.objective}", f"--workdir={run_dir}",
          f"--config.train.steps={FLAGS.steps}"])
    run_stage(["mlm_vs_clm.finetune", "--config=configs/finetune.py:news_quick", f"--config.checkpoint={run_dir}",
          f"--workdir={ft_dir}"])
    if os.path.isdir(hf_dir):
        shutil.rmtree(hf_dir)  # the export is derived data: rewritten from the checkpoint each time
    run_stage(["mlm_vs_clm.convert", "export-hf", f"--checkpoint={run_dir}", f"--out={hf_dir}"])

    with open(os.path.join(run_dir, "config.json")) as f:  # what the run trained
        config = json.load(f)
    phases = describe_schedule(config["objective"], config["train"]["steps"], config["mlm"]["mask_ratio"])
    print("\n" + "=" * 78)
    print(f"Pretrained the tiny encoder ({config['objective']}: {phases}) on BBC News text,")
    print("fine-tuned it on the news quick suite (topic, retrieval, cloze QA, truecasing).\n")
    with open(os.path.join(ft_dir, "results.md")) as f:
        print(f.read())
    print(f"checkpoint:        {os.path.join(run_dir, 'checkpoints')}")
    print(f"metrics:           {os.path.join(run_dir, 'metrics.jsonl')}")
    print(f"TensorBoard logs:  tensorboard --logdir {os.path.join(run_dir, 'tb')}")
    print(f"fine-tuning:       {os.path.join(ft_dir, 'results.json')} (plot: scores.png)")
    print(f"Hugging Face:      {hf_dir} ({hf_loader(hf_dir)})")
    print(f"demo took {time.time() - start:.0f} s")


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser())
