"""The encoder: Llama/EuroBERT-style blocks; only the attention mask differs between CLM and MLM.

Shapes in names: B batch, L length, D hidden, N query heads, K kv heads, H head dim,
F ffn, V vocab, S number of layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm_vs_clm.kernels import attention, ops

MASK_MODES = ("causal", "bidirectional")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# The config keys (under `model.`) that fix the parameter shapes and the function computed;
# the rest (dtype, attention kernel, remat, scan) are how it is run.
ARCHITECTURE_KEYS = (
    "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size", "rope_theta",
    "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
    "rope_original_max_position", "norm_eps",
)

ROPE_SCALINGS = ("", "llama3")  # model.rope_scaling: none, or Llama-3's frequency scaling


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_size: int
    rope_theta: float = 10000.0
    rope_scaling: str = ""
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = ""
    attention_max_segments: int = 32
    embed_grad_f32: str = "auto"  # a 16-bit embedding's gradient summed in f32: auto (off on CPUs), on, off
    scan_layers: bool = True
    remat_policy: str = "none"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, model_cfg) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(model_cfg).items() if k in names})


def rope_frequencies(cfg: ModelConfig) -> jnp.ndarray:
    """Inverse frequencies [H/2], with optional Llama-3 scaling (as in Hugging Face's Llama)."""
    h = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if cfg.rope_scaling == "llama3":
        factor, lo, hi = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_position
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = jnp.where(medium, smoothed, scaled)
    elif cfg.rope_scaling:
        raise ValueError(f"model.rope_scaling: unsupported value {cfg.rope_scaling!r} (one of {ROPE_SCALINGS})")
    return inv_freq


def rope_tables(positions_BxL: jnp.ndarray, cfg: ModelConfig):
    """cos and sin tables [B, L, H] in the rotate-half layout (halves repeated)."""
    angles_BxLxh = positions_BxL[..., None].astype(jnp.float32) * rope_frequencies(cfg)
    angles_BxLxH = jnp.concatenate([angles_BxLxh, angles_BxLxh], axis=-1)
    return jnp.cos(angles_BxLxH), jnp.sin(angles_BxLxH)


def apply_rope(x_BxLxNxH, cos_BxLxH, sin_BxLxH):
    rotated = ops.rotate_half(x_BxLxNxH)
    cos, sin = cos_BxLxH[:, :, None, :], sin_BxLxH[:, :, None, :]
    out = x_BxLxNxH.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x_BxLxNxH.dtype)


def attention_mask(segment_ids_BxL: jnp.ndarray) -> jnp.ndarray:
    """[B, 1, L, L] True where a query may attend to a key: same segment, never padding (0)."""
    seg = segment_ids_BxL
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    return same[:, None, :, :]


ATTENTION_IMPLS = attention.ATTENTION_IMPLS


def resolve_attention(cfg: ModelConfig) -> str:
    """The attention backend this model runs (kernels/attention.py)."""
    return attention.resolve(cfg.attention_impl, cfg.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


class Proj(nn.Module):
    """A bias-free projection: contracts the last `in_dims` axes of x with a kernel of shape
    in_shape + out_shape (e.g. [D] -> [N, H] for q_proj, [N, H] -> [D] for o_proj)."""

    out_shape: tuple
    axes: tuple
    cfg: ModelConfig
    in_dims: int = 1

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[-self.in_dims :]
        init = nn.initializers.normal(self.cfg.init_std)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, self.axes),
            tuple(in_shape) + tuple(self.out_shape),
            jnp.dtype(self.cfg.param_dtype),
        )
        dtype = jnp.dtype(self.cfg.dtype)
        # As one 2-D matmul [T, in] @ [in, out]: XLA's CPU backend runs multi-axis dot_generals
        # (and their gradients) slower than the same product in plain 2-D form (docs/performance.md).
        lead = x.shape[: x.ndim - self.in_dims]
        n_in, n_out = math.prod(in_shape), math.prod(self.out_shape)
        x_TxI = x.astype(dtype).reshape(math.prod(lead), n_in)
        kernel_IxO = kernel.reshape(n_in, n_out)
        y_TxO = ops.matmul(x_TxI, kernel_IxO, dtype)
        return y_TxO.reshape(*lead, *self.out_shape)


def _dense(features, axes, cfg: ModelConfig, name, in_axes=1):
    out_shape = tuple(features) if isinstance(features, tuple) else (features,)
    return Proj(out_shape, axes, cfg, in_axes, name=name)


class Block(nn.Module):
    cfg: ModelConfig
    mask_mode: str

    @nn.compact
    def __call__(self, x_BxLxD, mask_Bx1xLxL, packed, cos_BxLxH, sin_BxLxH):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        h_BxLxD = RMSNorm(cfg.norm_eps, dtype, pdtype, name="attn_norm")(x_BxLxD)
        q_BxLxNxH = _dense((N, H), ("embed", "heads", "head_dim"), cfg, "q_proj")(h_BxLxD)
        k_BxLxKxH = _dense((K, H), ("embed", "kv_heads", "head_dim"), cfg, "k_proj")(h_BxLxD)
        v_BxLxKxH = _dense((K, H), ("embed", "kv_heads", "head_dim"), cfg, "v_proj")(h_BxLxD)
        q_BxLxNxH = nn.with_logical_constraint(
            q_BxLxNxH, ("activation_batch", "activation_length", "activation_heads", None)
        )
        q_BxLxNxH = apply_rope(q_BxLxNxH, cos_BxLxH, sin_BxLxH)
        k_BxLxKxH = apply_rope(k_BxLxKxH, cos_BxLxH, sin_BxLxH)
        o_BxLxNxH = attention.dot_product_attention(
            resolve_attention(cfg), q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_Bx1xLxL, packed, self.mask_mode == "causal"
        )
        o_BxLxNxH = nn.with_logical_constraint(
            o_BxLxNxH, ("activation_batch", "activation_length", "activation_heads", None)
        )
        attn_BxLxD = _dense(cfg.hidden_size, ("heads", "head_dim", "embed"), cfg, "o_proj", in_axes=2)(o_BxLxNxH)
        x_BxLxD = x_BxLxD + attn_BxLxD
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("activation_batch", "activation_length", "activation_embed"))

        h_BxLxD = RMSNorm(cfg.norm_eps, dtype, pdtype, name="mlp_norm")(x_BxLxD)
        gate_BxLxF = _dense(cfg.ffn_size, ("embed", "mlp"), cfg, "gate_proj")(h_BxLxD)
        up_BxLxF = _dense(cfg.ffn_size, ("embed", "mlp"), cfg, "up_proj")(h_BxLxD)
        act_BxLxF = nn.silu(gate_BxLxF) * up_BxLxF
        act_BxLxF = nn.with_logical_constraint(act_BxLxF, ("activation_batch", "activation_length", "activation_mlp"))
        mlp_BxLxD = _dense(cfg.hidden_size, ("mlp", "embed"), cfg, "down_proj")(act_BxLxF)
        x_BxLxD = x_BxLxD + mlp_BxLxD
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("activation_batch", "activation_length", "activation_embed"))
        return x_BxLxD, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def embedding_lookup(table_VxD, tokens_BxL, accumulate_dtype=jnp.float32):
    """`jnp.take(table, tokens, axis=0)` whose backward pass sums the rows' gradients in
    `accumulate_dtype`. A GPU adds 16-bit values into memory with a compare-and-swap loop, which
    collapses when many positions share a token, as MLM's mask token does (docs/performance.md has
    what it cost a `210m` step on an H100).
    f32 additions are native atomics; the gradient is rounded to the table's dtype once."""
    return jnp.take(table_VxD, tokens_BxL, axis=0)


def _embedding_lookup_fwd(table_VxD, tokens_BxL, accumulate_dtype):
    # An empty [V, 0] array carries the table's vocabulary size and dtype into the backward pass.
    return jnp.take(table_VxD, tokens_BxL, axis=0), (jnp.zeros((table_VxD.shape[0], 0), table_VxD.dtype), tokens_BxL)


def _embedding_lookup_bwd(accumulate_dtype, res, g_BxLxD):
    carrier_Vx0, tokens_BxL = res
    d_VxD = jnp.zeros((carrier_Vx0.shape[0], g_BxLxD.shape[-1]), accumulate_dtype)
    d_VxD = d_VxD.at[tokens_BxL].add(g_BxLxD.astype(accumulate_dtype), mode="drop")
    return d_VxD.astype(carrier_Vx0.dtype), None


embedding_lookup.defvjp(_embedding_lookup_fwd, _embedding_lookup_bwd)


class Embed(nn.Module):
    """Token embedding table [V, D] (parameter `embedding`, sharded vocab x embed).

    The lookup first gathers the table over the `embed` (fsdp) axis, as FSDP does for every
    weight, keeping it split by vocabulary: a gather whose output were split along D would
    need an all-to-all into the batch-sharded activations, which XLA's SPMD partitioner can
    only do by replicating the whole tensor.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL):
        cfg = self.cfg
        table_VxD = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size),
            jnp.dtype(cfg.param_dtype),
        )
        table_VxD = nn.with_logical_constraint(table_VxD.astype(jnp.dtype(cfg.dtype)), ("vocab", None))
        if ops.embed_grad_f32(cfg.embed_grad_f32) and table_VxD.dtype.itemsize < 4:
            return embedding_lookup(table_VxD, tokens_BxL)
        return jnp.take(table_VxD, tokens_BxL, axis=0)


class Encoder(nn.Module):
    """Token embedding, S blocks, final RMSNorm: hidden states [B, L, D]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL, segment_ids_BxL, positions_BxL, mask_mode: str = "bidirectional"):
        cfg = self.cfg
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        x_BxLxD = Embed(cfg, name="embed")(tokens_BxL)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("activation_batch", "activation_length", "activation_embed"))
        mask_Bx1xLxL = attention_mask(segment_ids_BxL)
        packed = attention.prepare(resolve_attention(cfg), segment_ids_BxL, cfg.attention_max_segments)
        cos_BxLxH, sin_BxLxH = rope_tables(positions_BxL, cfg)

        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, mask_mode, name="layers")
            x_BxLxD, _ = stack(x_BxLxD, mask_Bx1xLxL, packed, cos_BxLxH, sin_BxLxH)
        else:
            for i in range(cfg.num_layers):
                x_BxLxD, _ = block(cfg, mask_mode, name=f"layers_{i}")(
                    x_BxLxD, mask_Bx1xLxL, packed, cos_BxLxH, sin_BxLxH
                )
        return RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), name="final_norm")(x_BxLxD)


class LanguageModel(nn.Module):
    """The encoder plus an untied output head. `encode` and `head` are separate so that a loss
    can project only the positions it predicts (sparse MLM head, chunked CLM loss)."""

    cfg: ModelConfig

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.lm_head = _dense(self.cfg.vocab_size, ("embed", "vocab"), self.cfg, None)

    def encode(self, tokens_BxL, segment_ids_BxL, positions_BxL, mask_mode: str = "bidirectional"):
        return self.encoder(tokens_BxL, segment_ids_BxL, positions_BxL, mask_mode)

    def head(self, h_xD):
        """Logits [..., V] in the compute dtype for hidden states [..., D]."""
        return self.lm_head(h_xD)

    def __call__(self, tokens_BxL, segment_ids_BxL, positions_BxL, mask_mode: str = "bidirectional"):
        return self.head(self.encode(tokens_BxL, segment_ids_BxL, positions_BxL, mask_mode))


def init_params(cfg: ModelConfig, rng, batch: int = 1, length: int = 8):
    """Boxed (logically partitioned) parameters; wrap in jax.eval_shape to allocate nothing."""
    model = LanguageModel(cfg)
    tokens = jnp.zeros((batch, length), jnp.int32)
    return model.init(rng, tokens, jnp.ones_like(tokens), jnp.zeros_like(tokens))["params"]


def count_params(params, include_head: bool = False) -> int:
    """Parameters (embeddings + blocks; the output head only when asked)."""
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]
    total = 0
    for path, leaf in flat:
        if not include_head and "lm_head" in jax.tree_util.keystr(path):
            continue
        total += math.prod(leaf.shape)
    return total
