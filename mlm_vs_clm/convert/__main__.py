"""python -m mlm_vs_clm.convert export-hf --checkpoint=PATH --out=DIR [--mask_mode=auto] [--dtype=float32]
    [--shard_size=5GB] [--overwrite] [--nosentence_transformers]
python -m mlm_vs_clm.convert import-hf --hf=DIR --out=PATH [--noscan_layers] [--base_config=configs/pretrain.py:tiny]

Errors print one line (`error: ...`) and exit with status 2.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags

from mlm_vs_clm.checkpoint import CheckpointError
from mlm_vs_clm.config import flags_parser, quiet_library_info
from mlm_vs_clm.convert.hf_export import export_checkpoint
from mlm_vs_clm.convert.hf_import import describe_import, import_hf, init_from_flags

COMMANDS = ("export-hf", "import-hf")
FLAGS = flags.FLAGS
# export-hf
flags.DEFINE_string("checkpoint", None, "export-hf: run directory (newest step) or step directory.")
flags.DEFINE_enum("mask_mode", "auto", ["auto", "causal", "bidirectional"],
                  "export-hf: auto = the mask of the objective that trained the last step (an import: its source's).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "export-hf: dtype of the weights written.")
flags.DEFINE_string("shard_size", "5GB", "export-hf: largest safetensors file (5GB, 500MB, 2GiB, bytes).")
flags.DEFINE_bool("overwrite", False, "export-hf: replace a non-empty --out folder.")
flags.DEFINE_bool("sentence_transformers", True,
                  "export-hf, encoders: also write the sentence-transformers files (mean pooling).")
# import-hf
flags.DEFINE_string("hf", None, "import-hf: folder with config.json, safetensors and tokenizer.json.")
flags.DEFINE_bool("scan_layers", True, "import-hf: stacked layer parameters (model.scan_layers).")
flags.DEFINE_string("base_config", "configs/pretrain.py:tiny",
                    "import-hf: config whose model.* and tokens.* are replaced by the checkpoint's.")
# both
flags.DEFINE_string("out", None, "export-hf: output folder; import-hf: new run directory.")

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '123456' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"--shard_size: cannot read {text!r} (use e.g. 5GB, 500MB, 123456)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise ValueError("--shard_size must be positive")
    return size


def _run(command: str) -> None:
    f = FLAGS
    if command == "export-hf":
        if not f.checkpoint or not f.out:
            raise ValueError("export-hf needs --checkpoint and --out")
        config = export_checkpoint(f.checkpoint, f.out, f.mask_mode, f.dtype, parse_size(f.shard_size),
                                   overwrite=f.overwrite, sentence_transformers=f.sentence_transformers)
        arch = config["architectures"][0]
        kind = "causal" if arch == "LlamaForCausalLM" else "bidirectional"
        extra = " or SentenceTransformer" if os.path.exists(os.path.join(f.out, "modules.json")) else ""
        remote = "trust_remote_code=True" if config.get("auto_map") else "no remote code"
        print(f"wrote {f.out}: {kind} model ({config['model_type']}); load with {arch}{extra}, {remote}")
    else:
        if not f.hf or not f.out:
            raise ValueError("import-hf needs --hf and --out")
        out = os.path.abspath(f.out)
        step_dir, config = import_hf(f.hf, out, scan_layers=f.scan_layers, base_config=f.base_config)
        print(f"imported {describe_import(config)}")
        print(f"wrote {step_dir}; train from it with:\n  " + " ".join(init_from_flags(config, out)))


def main(argv) -> int:
    """`argv` as absl leaves it: [program, COMMAND]."""
    quiet_library_info()
    commands = argv[1:]
    if len(commands) != 1 or commands[0] not in COMMANDS:
        print(f"error: give one command, {' or '.join(COMMANDS)} (got {' '.join(commands) or 'none'})", file=sys.stderr)
        return 2
    try:
        _run(commands[0])
    except (ValueError, OSError, CheckpointError) as e:  # ConversionError is a ValueError
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=flags_parser())
