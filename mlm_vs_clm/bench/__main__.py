"""`python -m mlm_vs_clm.bench`: the training-step benchmark (see mlm_vs_clm/bench/__init__.py)."""

from __future__ import annotations

import json
import sys

from absl import app, flags

from mlm_vs_clm import bench
from mlm_vs_clm.config import define_config_flag, flags_parser
from mlm_vs_clm.kernels import host_memory

define_config_flag("configs/pretrain.py:small", "Pretraining config file:preset.")
flags.DEFINE_string("json", "", "Write the results here as JSON.")
flags.DEFINE_string("objectives", ",".join(bench.DEFAULT_OBJECTIVES), "Comma-separated objectives to time.")
flags.DEFINE_integer("steps", 10, "Timed steps per objective (after the warm-up).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("rewarm", 1, "Untimed steps that open each runner's turn in every round, so a timed step "
                     "follows a step of its own (interleaved_times).")
flags.DEFINE_bool("peer", False, "Also time Hugging Face LlamaForCausalLM (PyTorch) on the same batch, in a "
                  "process of its own with the C library's allocator defaults (as its users run it).")
flags.DEFINE_bool("data", False, "Also time the input pipeline (rows/s).")
flags.DEFINE_bool("peer_kept", False, "Also time the peer with host memory kept mapped as ours "
                  "(mlm_vs_clm/kernels/host_memory.py), in a process of its own.")
flags.DEFINE_bool("keep_host_memory", True, "Keep host memory mapped between steps for ours "
                  "(mlm_vs_clm/kernels/host_memory.py). Unset: as the train and finetune CLIs (MLM_VS_CLM_HOST_MEMORY, "
                  "by default kept when JAX runs on the CPU); --keep_host_memory: on any backend; "
                  "--nokeep_host_memory: glibc's defaults.")
flags.DEFINE_float("data_seconds", 10.0, "How long to run the input pipeline for --data.")


def main(argv):
    del argv
    f = flags.FLAGS
    try:  # before the backend starts
        if f["keep_host_memory"].present:  # asked for on the command line: on any backend, or off
            kept = f.keep_host_memory and host_memory.keep_mapped(respect_env=False)
        else:  # as the train CLI: MLM_VS_CLM_HOST_MEMORY, by default kept when JAX runs on the CPU
            kept = host_memory.keep_mapped()
        bench.check_args(f.config, f.json)
        result = bench.run(f.config, [s.strip() for s in f.objectives.split(",") if s.strip()], f.steps, f.warmup,
                     f.peer, f.data, f.data_seconds, f.peer_kept, f.rewarm)
    except (ValueError, RuntimeError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    result["host_memory_kept_mapped"] = bool(kept)
    print(bench.table(result))
    if f.json:
        with open(f.json, "w") as fh:
            json.dump(result, fh, indent=2, sort_keys=True)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser("error: "))
