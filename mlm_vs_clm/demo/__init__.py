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
import subprocess
import sys

from mlm_vs_clm import schedules


def run_stage(args: list[str]) -> None:
    print("\n$ python -m " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", *args])
    if proc.returncode != 0:
        print(f"demo: step failed with exit status {proc.returncode}: {' '.join(args)}", file=sys.stderr)
        sys.exit(proc.returncode)


def describe_schedule(objective: str, steps: int, mask_ratio: float) -> str:
    """The phases a run trained, e.g. 'CLM for 100 steps, then MLM-40 for 100 steps'."""
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
