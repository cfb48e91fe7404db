"""Pretraining configs: `--config=configs/pretrain.py:SIZE[,OBJECTIVE]`.

SIZE is one of `tiny` (tests, seconds), `small` (benchmarks, minutes on a CPU), `210m`,
`610m`, `1b` (PAPER.md dimensions). OBJECTIVE is an objective schedule: `clm`, `mlm20`,
`mlm30`, `mlm40` (default), `mlm50`, or `clmXX_mlmYY` (CLM for the first XX % of the steps,
then MLM with YY % masking; a plain `mlm` takes its ratio from `mlm.mask_ratio`, which also
sets the validation masks of every run). Any key can be overridden: `--config.train.steps=100`.
"""

import ml_collections

# name: (layers, hidden, heads, kv_heads, ffn, vocab, seq_len, batch, steps)
SIZES = {
    "tiny": (2, 64, 4, 2, 192, 4096, 128, 16, 200),
    "small": (6, 256, 4, 4, 1024, 32000, 128, 32, 2000),
    "210m": (12, 768, 12, 12, 3072, 128256, 2048, 2304, 42000),
    "610m": (26, 1152, 18, 6, 4096, 128256, 2048, 2304, 42000),
    "1b": (28, 1728, 18, 6, 5120, 128256, 2048, 2304, 42000),
}

# Logical axis name -> mesh axes. Parameters are sharded over `fsdp` (and `tensor` for the
# head / heads / MLP dimension); activations over the batch axes.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
)


def _size_config(name: str) -> ml_collections.ConfigDict:
    layers, hidden, heads, kv_heads, ffn, vocab, seq_len, batch, steps = SIZES[name]
    big = name in ("210m", "610m", "1b")
    c = ml_collections.ConfigDict()
    c.preset = name
    c.seed = 0
    c.init_from = ""
    c.init_from_allow_missing = False
    # With init_from: take the architecture (model.vocab_size ... norm_eps), the special token
    # ids and the tokenizer of the source checkpoint, so `--config.init_from=DIR` alone suffices.
    c.init_from_architecture = True

    c.model = ml_collections.ConfigDict(
        dict(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            ffn_size=ffn,
            rope_theta=10000.0,
            # Llama-3 style frequency scaling for imported checkpoints ('' = none, 'llama3').
            rope_scaling="",
            rope_scaling_factor=8.0,
            rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0,
            rope_original_max_position=8192,
            norm_eps=1e-5,
            init_std=0.02,
            dtype="bfloat16" if big else "float32",
            param_dtype="float32",
            # Attention kernel: '' (by device and dtype: model.resolve_attention), 'xla', 'cudnn'
            # (dense segment mask), 'cudnn_packed' (cuDNN's packed layout, Hopper+: gpu_ops.py).
            attention_impl="",
            # cudnn_packed: segments per row it describes; a batch with more takes the dense mask.
            attention_max_segments=32,
            # Unrolled on `small`: on a CPU the scan's stacked residuals (zeroed, then written and
            # read layer by layer) cost 9 % of the CLM step (docs/performance.md).
            scan_layers=name != "small",
            # 'none', 'full', 'dots', 'dots_no_batch' (see model.REMAT_POLICIES).
            remat_policy="dots_no_batch" if big else "none",
        )
    )

    c.tokens = ml_collections.ConfigDict(
        dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3, mask_id=4, special_ids=(0, 1, 2, 3, 4))
    )

    c.objective = "mlm40"
    # mlm.mask_ratio is (a) the ratio of an objective written plainly 'mlm' (as in 'clm50_mlm')
    # and (b) the mask ratio of val_mlm_loss for every run, whatever its objective. An objective
    # that names its own ratio ('mlm40', the default, or 'clm25_mlm30') trains at that ratio and
    # ignores this key: `--config.mlm.mask_ratio=0.3` alone changes only the validation masks.
    c.mlm = ml_collections.ConfigDict(
        dict(
            mask_ratio=0.4,
            replacement="mask",  # 'mask' (every selected token -> mask token) or '80_10_10'
            sparse_head=True,
        )
    )
    # Cross-entropies are computed this many positions of each row at a time (never full f32 logits).
    c.loss_chunk_size = 128 if big else 32

    c.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=3e-4 if big else 1e-3,
            schedule="wsd",  # 'wsd' (warmup-stable-decay), 'cosine', 'constant'
            warmup_fraction=0.01 if big else 0.05,
            decay_fraction=0.1,  # wsd: last fraction of steps decays linearly to min_lr
            min_lr_ratio=0.0,
            rewarmup_at_switch=False,
            rewarmup_fraction=0.01,
            b1=0.9,
            b2=0.95,
            eps=1e-5,
            weight_decay=0.1,
            clip_norm=1.0,
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            steps=steps,
            batch_size=batch,
            seq_len=seq_len,
            grad_accum_steps=1,
            log_every=10 if not big else 50,
            eval_every=100 if not big else 1000,
            eval_batches=4,
            checkpoint_every=100 if not big else 1000,
            keep=3,
            keep_steps=(),
            max_bad_steps=10,
            progress=True,
        )
    )

    c.mesh = ml_collections.ConfigDict(
        # layout: '' (use data/fsdp/tensor as given) or a named layout of configs/meshes.py
        dict(data=-1, fsdp=1 if not big else -1, tensor=1, rules=DEFAULT_RULES, layout="", devices_per_node=0)
    )
    if big:
        c.mesh.data = 1

    c.data = ml_collections.ConfigDict(
        dict(
            source="demo",  # a path, a glob, 'tfds:NAME' or 'demo'
            text_field="text",
            text_mode="file",  # plain text: 'file' (one document per file) or 'blocks' (blank-line blocks)
            tokenizer="",  # path of a tokenizer; '' = train one on the source (cached)
            tokenizer_vocab_size=vocab if not big else 32000,
            shuffle=True,
            worker_count=0,
            # False: every process packs the global stream and keeps its rows (batches do not
            # depend on the process count); True: each process reads only its own documents.
            shard_by_process=False,
            validation_source="",  # '' = the held-out part of the source
        )
    )
    return c


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    parts = [p.strip() for p in (arg or "tiny").split(",") if p.strip()]
    sizes = [p for p in parts if p in SIZES]
    others = [p for p in parts if p not in SIZES]
    if len(sizes) > 1:
        raise ValueError(f"config: more than one size preset in {arg!r}")
    if len(others) > 1:
        raise ValueError(f"config: more than one objective preset in {arg!r}")
    config = _size_config(sizes[0] if sizes else "tiny")
    if others:
        from mlm_vs_clm import schedules

        schedules.parse_objective(others[0])  # fails early on an unknown preset
        config.objective = others[0]
    return config
