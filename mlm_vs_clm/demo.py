"""The demo behind `make demo`: pretrain a tiny encoder CLM-then-MLM (or `--objective`) on real
news text, fine-tune it on the `news` quick suite, export it for Hugging Face, and print the
results, the phases trained and how to load the export.

`python -m mlm_vs_clm.demo --workdir=demo_runs [--steps=200] [--objective=clm50_mlm40]`.
Each stage is the project's own command line, run as a subprocess and printed first, so a
reader can rerun any of them.
Rerunning the demo resumes: finished training and finished fine-tuning runs are not repeated.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The demo's flags, defined when it runs (importing the module for its helpers defines none:
    `workdir` would clash with the train command's)."""
    flags.DEFINE_string("workdir", "demo_runs", "Where the demo writes its runs.")
    flags.DEFINE_integer("steps", 200, "Pretraining steps of the tiny model.")
    flags.DEFINE_string("objective", "clm50_mlm40", "Objective schedule of the pretraining run.")


def _run(args: list[str]) -> None:
    print("\n$ python -m " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", *args])
    if proc.returncode != 0:
        print(f"demo: step failed with exit status {proc.returncode}: {' '.join(args)}", file=sys.stderr)
        sys.exit(proc.returncode)


def describe_schedule(objective: str, steps: int, mask_ratio: float) -> str:
    """The phases a run trained, e.g. 'CLM for 100 steps, then MLM-40 for 100 steps'."""
    from mlm_vs_clm import schedules

    sched = schedules.objective_schedule(objective, steps, mask_ratio)
    ends = (*sched.starts[1:], steps)
    return ", then ".join(f"{o.name.upper().replace('MLM', 'MLM-')} for {end - start} steps"
                          for start, o, end in zip(sched.starts, sched.objectives, ends))


def hf_loader(hf_dir: str) -> str:
    """How to load the exported folder, read from its config.json."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        causal = json.load(f).get("is_causal")
    if causal:
        return "LlamaForCausalLM.from_pretrained(...): a causal model"
    return "AutoModelForMaskedLM.from_pretrained(...): a bidirectional encoder (native EuroBERT, no remote code)"


def main(argv) -> None:
    del argv
    start = time.time()
    workdir = os.path.abspath(FLAGS.workdir)
    run_dir = os.path.join(workdir, f"pretrain_tiny_{FLAGS.objective}")
    ft_dir = os.path.join(workdir, "finetune_news_quick")
    hf_dir = os.path.join(workdir, "hf_export")

    _run(["mlm_vs_clm.train", f"--config=configs/pretrain.py:tiny,{FLAGS.objective}", f"--workdir={run_dir}",
          f"--config.train.steps={FLAGS.steps}"])
    _run(["mlm_vs_clm.finetune", "--config=configs/finetune.py:news_quick", f"--config.checkpoint={run_dir}",
          f"--workdir={ft_dir}"])
    if os.path.isdir(hf_dir):
        shutil.rmtree(hf_dir)  # the export is derived data: rewritten from the checkpoint each time
    _run(["mlm_vs_clm.convert", "export-hf", f"--checkpoint={run_dir}", f"--out={hf_dir}"])

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
    _define_flags()
    app.run(main)
