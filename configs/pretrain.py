"""Pretraining configs: `--config=configs/pretrain.py:SIZE[,OBJECTIVE]`.

SIZE is one of `tiny` (tests, seconds), `small` (benchmarks, minutes on a CPU), `210m`,
`610m`, `1b` (PAPER.md dimensions). OBJECTIVE is an objective schedule: `clm`, `mlm20`,
`mlm30`, `mlm40` (default), `mlm50`, `clmXX_mlmYY` (CLM for the first XX % of the steps,
then MLM with YY % masking) or `clmNk_mlmYY` (CLM for the first N thousand steps, as in the
study's `610m-clm-10k-mlm40-42k`); a plain `mlm` takes its ratio from `mlm.mask_ratio`. Validation
masks are fixed for every run (40 %, mask-token replacement: mlm_vs_clm/step.py), whatever its
mlm.mask_ratio and mlm.replacement. Any key can be overridden: `--config.train.steps=100`.
"""

import dataclasses

import ml_collections

from mlm_vs_clm import schedules


@dataclasses.dataclass(frozen=True)
class Size:
    """A size preset: the architecture, the batch and length, and how a run of that size is run."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int  # embedding rows
    seq_len: int
    batch: int  # rows per optimizer step (global)
    steps: int
    tokenizer_vocab: int = 0  # pieces of a tokenizer trained on the source; 0 = `vocab`
    dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = True
    loss_chunk_size: int = 32
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.05
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    mesh_data: int = -1  # -1 = every device not used by the other axes
    mesh_fsdp: int = 1


def embedding_rows(tokenizer_vocab: int, multiple: int = 128) -> int:
    """Embedding rows for a tokenizer: its size rounded up to a multiple of 128, so that no row
    is left that no token id can reach (every row trains)."""
    return -(-tokenizer_vocab // multiple) * multiple


# The study's sizes (PAPER.md dimensions). The vocabulary is the project's 32,000-piece
# sentencepiece tokenizer, so the embedding has embedding_rows(32000) = 32,000 rows: every row
# trains. PAPER.md's 128,256 rows belong to the Llama-3 tokenizer; keep them only with that
# tokenizer (or another of that size): `--config.data.tokenizer=DIR --config.model.vocab_size=128256`.
# Project choices, not PAPER.md's: the peak learning rate 3e-4 (PAPER.md: unknown), bf16 compute,
# rematerialised blocks, FSDP over every device.
_PAPER_TOKENIZER = 32000
_PAPER_RUN = dict(
    seq_len=2048, batch=2304, steps=42000, tokenizer_vocab=_PAPER_TOKENIZER, dtype="bfloat16",
    remat_policy="dots_no_batch",
    loss_chunk_size=128, learning_rate=3e-4, warmup_fraction=0.01, log_every=50, eval_every=1000,
    checkpoint_every=1000, mesh_data=1, mesh_fsdp=-1,
)

SIZES = {
    "tiny": Size(layers=2, hidden=64, heads=4, kv_heads=2, ffn=192, vocab=4096, seq_len=128, batch=16, steps=200),
    # Unrolled on `small`: on a CPU the scan's stacked residuals (zeroed, then written and read
    # layer by layer) slow the step (docs/performance.md).
    "small": Size(layers=6, hidden=256, heads=4, kv_heads=4, ffn=1024, vocab=32000, seq_len=128, batch=32,
                  steps=2000, scan_layers=False),
    "210m": Size(layers=12, hidden=768, heads=12, kv_heads=12, ffn=3072, vocab=embedding_rows(_PAPER_TOKENIZER),
                 **_PAPER_RUN),
    "610m": Size(layers=26, hidden=1152, heads=18, kv_heads=6, ffn=4096, vocab=embedding_rows(_PAPER_TOKENIZER),
                 **_PAPER_RUN),
    "1b": Size(layers=28, hidden=1728, heads=18, kv_heads=6, ffn=5120, vocab=embedding_rows(_PAPER_TOKENIZER),
               **_PAPER_RUN),
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
    z = SIZES[name]
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
            vocab_size=z.vocab,
            hidden_size=z.hidden,
            num_layers=z.layers,
            num_heads=z.heads,
            num_kv_heads=z.kv_heads,
            ffn_size=z.ffn,
            rope_theta=10000.0,
            # Llama-3 style frequency scaling for imported checkpoints ('' = none, 'llama3').
            rope_scaling="",
            rope_scaling_factor=8.0,
            rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0,
            rope_original_max_position=8192,
            norm_eps=1e-5,
            init_std=0.02,
            dtype=z.dtype,
            param_dtype="float32",
            # Attention backend: '' (by device and dtype: kernels/attention.py), 'xla', 'cudnn'
            # (dense segment mask), 'cudnn_packed' (cuDNN's packed layout, Hopper+: kernels/gpu.py).
            attention_impl="",
            # cudnn_packed: segments per row it describes; a batch with more takes the dense mask.
            attention_max_segments=32,
            embed_grad_f32="auto",  # a 16-bit embedding's gradient summed in f32: auto (off on CPUs), on, off
            scan_layers=z.scan_layers,
            # 'none', 'full', 'dots', 'dots_no_batch' (see model.REMAT_POLICIES).
            remat_policy=z.remat_policy,
        )
    )

    c.tokens = ml_collections.ConfigDict(
        dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3, mask_id=4, special_ids=(0, 1, 2, 3, 4))
    )

    c.objective = "mlm40"
    # mlm.mask_ratio is the ratio of an objective written plainly 'mlm' (as in 'clm50_mlm'). An
    # objective that names its own ratio ('mlm40', the default, or 'clm25_mlm30') trains at that
    # ratio and ignores this key. val_mlm_loss never depends on it: its masks are fixed (step.py).
    c.mlm = ml_collections.ConfigDict(
        dict(
            mask_ratio=0.4,
            replacement="mask",  # 'mask' (every selected token -> mask token) or '80_10_10'
            sparse_head=True,
        )
    )
    # Cross-entropies are computed this many positions of each row at a time (never full f32 logits).
    c.loss_chunk_size = z.loss_chunk_size

    c.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=z.learning_rate,
            schedule="wsd",  # 'wsd' (warmup-stable-decay), 'cosine', 'constant'
            warmup_fraction=z.warmup_fraction,
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
            steps=z.steps,
            batch_size=z.batch,
            seq_len=z.seq_len,
            grad_accum_steps=1,
            log_every=z.log_every,
            eval_every=z.eval_every,
            eval_batches=4,
            checkpoint_every=z.checkpoint_every,
            keep=3,
            keep_steps=(),
            max_bad_steps=10,
            progress=True,
        )
    )

    c.mesh = ml_collections.ConfigDict(
        # layout: '' (use data/fsdp/tensor as given) or a named layout (mlm_vs_clm/sharding.py)
        dict(data=z.mesh_data, fsdp=z.mesh_fsdp, tensor=1, rules=DEFAULT_RULES, layout="", devices_per_node=0)
    )

    c.data = ml_collections.ConfigDict(
        dict(
            source="demo",  # a path, a glob, 'tfds:NAME' or 'demo'
            text_field="text",
            text_mode="file",  # plain text: 'file' (one document per file) or 'blocks' (blank-line blocks)
            tokenizer="",  # path of a tokenizer; '' = train one on the source (cached)
            tokenizer_vocab_size=z.tokenizer_vocab or z.vocab,
            shuffle=True,
            # The data order's seed; -1 = `seed`. Fix it (e.g. 0) to vary only the initialisation
            # and the masks across seeds, as `make replicate` does for its pretraining seeds.
            seed=-1,
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
        try:
            schedules.parse_objective(others[0])  # fails early on an unknown preset
        except ValueError as e:
            raise ValueError(f"config: {others[0]!r} is neither a size ({', '.join(SIZES)}) nor an objective "
                             f"preset ({e})") from None
        config.objective = others[0]
    return config
