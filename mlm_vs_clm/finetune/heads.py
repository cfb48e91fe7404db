"""Task heads on top of the pretrained encoder (`LanguageModel.encode`; the LM head is dropped).

The parameter tree is {'encoder': <the pretrained encoder's tree>, 'head': {'kernel', 'bias'}}
(retrieval has no head: its output is the pooled, L2-normalised representation). Sequence
classification offers two heads (`head`): 'linear' (pooled -> classes) and 'eurobert'
(pooled -> dense D -> exact GELU -> classes, EuroBertForSequenceClassification's head; its
dense layer is 'head_dense'). Both export exactly to Hugging Face (docs/convert.md).
Shapes: B batch, L length, D hidden, C classes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mlm_vs_clm.finetune.tasks import IGNORE
from mlm_vs_clm.model import MASK_MODES, Encoder, ModelConfig

POOLINGS = ("mean", "first", "last")
HEADS = ("linear", "eurobert")
NEG_INF = -1e9


def pool(h_BxLxD, segment_ids_BxL, pooling: str):
    """One vector per row over its real tokens (segment id > 0; rows are right-padded)."""
    real_BxL = (segment_ids_BxL > 0).astype(jnp.float32)
    h_BxLxD = h_BxLxD.astype(jnp.float32)
    if pooling == "mean":
        total_BxD = jnp.einsum("bld,bl->bd", h_BxLxD, real_BxL)
        return total_BxD / jnp.maximum(real_BxL.sum(axis=1, keepdims=True), 1.0)
    if pooling == "first":
        return h_BxLxD[:, 0]
    if pooling == "last":
        last_B = jnp.maximum(real_BxL.sum(axis=1).astype(jnp.int32) - 1, 0)
        return jnp.take_along_axis(h_BxLxD, last_B[:, None, None], axis=1)[:, 0]
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class FinetuneModel(nn.Module):
    cfg: ModelConfig
    kind: str  # see tasks.KINDS
    num_outputs: int = 0
    pooling: str = "mean"
    mask_mode: str = "bidirectional"
    head_type: str = "linear"  # sequence classification: see HEADS

    def setup(self):
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"attention must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if self.head_type not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head_type!r}")
        self.encoder = Encoder(self.cfg)
        if self.kind == "classification" and self.head_type == "eurobert":
            self.head_dense = nn.Dense(
                self.cfg.hidden_size,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(self.cfg.init_std), ("embed", None)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
            )
        if self.kind != "retrieval":
            self.head = nn.Dense(
                self.num_outputs,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(self.cfg.init_std), ("embed", None)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
            )

    def hidden(self, tokens_BxL, segment_ids_BxL, positions_BxL):
        return self.encoder(tokens_BxL, segment_ids_BxL, positions_BxL, self.mask_mode)

    def __call__(self, tokens_BxL, segment_ids_BxL, positions_BxL):
        """classification: logits [B, C]; token_classification: [B, L, C]; qa: (start, end)
        logits, each [B, L]; retrieval: unit-norm embeddings [B, D]."""
        h_BxLxD = self.hidden(tokens_BxL, segment_ids_BxL, positions_BxL)
        if self.kind == "retrieval":
            e_BxD = pool(h_BxLxD, segment_ids_BxL, self.pooling)
            return e_BxD / jnp.maximum(jnp.linalg.norm(e_BxD, axis=-1, keepdims=True), 1e-6)
        if self.kind == "classification":
            pooled_BxD = pool(h_BxLxD, segment_ids_BxL, self.pooling)
            if self.head_type == "eurobert":  # torch.nn.GELU(): the exact (erf) form
                pooled_BxD = jax.nn.gelu(self.head_dense(pooled_BxD), approximate=False)
            return self.head(pooled_BxD)
        out_BxLxC = self.head(h_BxLxD.astype(jnp.float32))
        if self.kind == "qa":
            return out_BxLxC[..., 0], out_BxLxC[..., 1]
        return out_BxLxC


def _ce(logits_NxC, labels_N, weights_N):
    per_N = optax.softmax_cross_entropy_with_integer_labels(logits_NxC, jnp.maximum(labels_N, 0))
    return jnp.sum(per_N * weights_N) / jnp.maximum(jnp.sum(weights_N), 1.0)


def forward(model: FinetuneModel, params, batch, prefix: str = ""):
    return model.apply({"params": params}, batch[prefix + "tokens"], batch[prefix + "segment_ids"],
                       batch[prefix + "positions"])


def loss_fn(model: FinetuneModel, params, batch, temperature: float = 0.05) -> jnp.ndarray:
    """Mean training loss of one batch (scalar float32)."""
    kind = model.kind
    if kind == "classification":
        logits_BxC = forward(model, params, batch)
        return _ce(logits_BxC, batch["labels"], jnp.ones_like(batch["labels"], jnp.float32))
    if kind == "token_classification":
        logits_BxLxC = forward(model, params, batch)
        labels_BxL = batch["labels"]
        weights = (labels_BxL != IGNORE).astype(jnp.float32)
        return _ce(logits_BxLxC.reshape(-1, logits_BxLxC.shape[-1]), labels_BxL.reshape(-1), weights.reshape(-1))
    if kind == "qa":
        start_BxL, end_BxL = forward(model, params, batch)
        allowed_BxL = (batch["context_mask"] > 0) | (jnp.arange(start_BxL.shape[1]) == 0)[None, :]
        ones_B = jnp.ones(start_BxL.shape[:1], jnp.float32)
        start_loss = _ce(jnp.where(allowed_BxL, start_BxL, NEG_INF), batch["start_positions"], ones_B)
        end_loss = _ce(jnp.where(allowed_BxL, end_BxL, NEG_INF), batch["end_positions"], ones_B)
        return 0.5 * (start_loss + end_loss)
    if kind == "retrieval":
        q_BxD = forward(model, params, batch, "q_")
        d_BxD = forward(model, params, batch, "d_")
        scores_BxB = q_BxD @ d_BxD.T / temperature  # in-batch negatives: row i's positive is column i
        labels_B = jnp.arange(scores_BxB.shape[0])
        if "relevant_ids" in batch:  # a column j != i whose document is relevant to query i is no negative
            relevant_BxB = (batch["relevant_ids"][:, None, :] == batch["doc_id"][None, :, None]).any(-1)
            scores_BxB = jnp.where(relevant_BxB & (labels_B[:, None] != labels_B[None, :]), NEG_INF, scores_BxB)
        return _ce(scores_BxB, labels_B, jnp.ones(scores_BxB.shape[:1], jnp.float32))
    raise ValueError(f"unknown task kind {kind!r}")


def init_head(model: FinetuneModel, rng, seq_len: int = 8):
    """Boxed parameters of the whole model (encoder freshly initialised; callers replace it)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return model.init(rng, tokens, jnp.ones_like(tokens), jnp.zeros_like(tokens))["params"]


def partition_specs(model: FinetuneModel):
    """Logical PartitionSpecs of the model's parameter tree (allocates nothing)."""
    return nn.get_partition_spec(jax.eval_shape(lambda r: init_head(model, r), jax.random.PRNGKey(0)))
