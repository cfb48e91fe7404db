"""`python -m mlm_vs_clm.replicate`: `make replicate` (see mlm_vs_clm/replicate/__init__.py)."""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

from mlm_vs_clm.config import flags_parser
from mlm_vs_clm.replicate import (
    SCALES,
    SCHEDULES,
    finals,
    finetune,
    intermediate_checkpoints,
    output_dirs,
    run_cpt,
    run_pretraining,
    stage,
)
from mlm_vs_clm.replicate import report as replication_report

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "", "Where the runs go (default: replication_runs, or replication_runs_SCALE).")
flags.DEFINE_string("report_dir", "", "Where REPORT.md and its plots go (default: replication for --scale=full, "
                    "else WORKDIR/report).")
flags.DEFINE_enum("scale", "full", ["full", "smoke"], "full: `make replicate`; smoke: seconds (tests).")


def main(argv) -> int:
    del argv
    scale = SCALES[FLAGS.scale]
    workdir, report_dir = output_dirs(FLAGS.scale, FLAGS.workdir, FLAGS.report_dir)
    start = time.time()
    try:
        seeds = scale["pretrain_seeds"]
        stage(f"1/4 pretraining: tiny, {scale['steps']} steps, {', '.join(SCHEDULES)} x pretraining seeds "
              f"{', '.join(map(str, seeds))}")
        runs = run_pretraining(workdir, scale)
        stage(f"2/4 continued pretraining: {scale['cpt_steps']} MLM-40 steps from the CLM and MLM runs")
        cpt = run_cpt(workdir, scale, runs)
        stage("3/4 fine-tuning the final checkpoints (learning rates x seeds)")
        final_dir = finetune(workdir, "finetune_final", finals(runs, cpt), scale, scale["learning_rates"])
        stage("4/4 fine-tuning the intermediate checkpoints of the MLM and CLM runs")
        middle = [c for name in ("mlm40", "clm") for s in seeds
                  for c in intermediate_checkpoints(runs[(name, s)], scale["steps"])]
        default_lr = 1e-3 if 1e-3 in scale["learning_rates"] else scale["learning_rates"][0]
        middle_dir = finetune(workdir, "finetune_intermediate", middle, scale, (default_lr,))
    except RuntimeError as e:
        print(f"replicate: {e}", file=sys.stderr)
        return 1
    path = replication_report.write(
        report_dir, runs=runs, cpt=cpt, final_dir=final_dir, middle_dir=middle_dir, scale=scale,
        scale_name=FLAGS.scale, pretrain_csv=os.path.join(workdir, "pretrain", "results.csv"),
        elapsed_s=time.time() - start,
    )
    print(f"\nreplicate: wrote {path} ({time.time() - start:.0f} s)")
    with open(path) as f:
        text = f.read()
    end = text.find("## 1 and 3")
    print(text[:end] if end > 0 else text)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=flags_parser())
