"""python -m mlm_vs_clm.convert export-hf --checkpoint=PATH --out=DIR [--mask_mode=auto] [--dtype=float32] [--shard_size=5GB] [--overwrite] [--no_sentence_transformers]
python -m mlm_vs_clm.convert import-hf --hf=DIR --out=PATH [--no_scan_layers]

Errors print one line (`error: ...`) and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '123456' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"--shard_size: cannot read {text!r} (use e.g. 5GB, 500MB, 123456)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError("--shard_size must be positive")
    return size


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mlm_vs_clm.convert", description="Hugging Face conversion.")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export-hf", help="our checkpoint -> Hugging Face folder")
    exp.add_argument("--checkpoint", required=True, help="run directory (newest step) or step directory")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--mask_mode", default="auto", choices=("auto", "causal", "bidirectional"),
                     help="auto: the mask of the objective that trained the last step (an import: its source's)")
    exp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    exp.add_argument("--shard_size", default="5GB", type=parse_size, help="largest safetensors file")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    exp.add_argument("--sentence_transformers", dest="sentence_transformers", action="store_true", default=True,
                     help="encoders: also write the sentence-transformers files (mean pooling; the default)")
    exp.add_argument("--no_sentence_transformers", dest="sentence_transformers", action="store_false")
    imp = sub.add_parser("import-hf", help="Hugging Face Llama or EuroBERT folder -> our checkpoint")
    imp.add_argument("--hf", required=True, help="folder with config.json, safetensors and tokenizer.json")
    imp.add_argument("--out", required=True, help="new run directory to write")
    imp.add_argument("--no_scan_layers", action="store_true", help="per-layer params (model.scan_layers=False)")
    imp.add_argument("--base_config", default="configs/pretrain.py:tiny",
                     help="config whose model.* and tokens.* are replaced by the checkpoint's")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from mlm_vs_clm.checkpoint import CheckpointError

    try:
        if args.command == "export-hf":
            from mlm_vs_clm.convert.hf_export import export_checkpoint

            config = export_checkpoint(args.checkpoint, args.out, args.mask_mode, args.dtype, args.shard_size,
                                       overwrite=args.overwrite, sentence_transformers=args.sentence_transformers)
            arch = config["architectures"][0]
            kind = "causal" if arch == "LlamaForCausalLM" else "bidirectional"
            extra = " or SentenceTransformer" if os.path.exists(os.path.join(args.out, "modules.json")) else ""
            remote = "trust_remote_code=True" if config.get("auto_map") else "no remote code"
            print(f"wrote {args.out}: {kind} model ({config['model_type']}); load with {arch}{extra}, {remote}")
        else:
            from mlm_vs_clm.convert.hf_import import describe_import, import_hf, init_from_flags

            out = os.path.abspath(args.out)
            step_dir, config = import_hf(args.hf, out, scan_layers=not args.no_scan_layers, base_config=args.base_config)
            print(f"imported {describe_import(config)}")
            print(f"wrote {step_dir}; train from it with:\n  " + " ".join(init_from_flags(config, out)))
    except (ValueError, OSError, CheckpointError) as e:  # ConversionError is a ValueError
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
