"""CLM and MLM objectives on packed rows. Neither ever holds full f32 [B, L, V] logits.

A batch is a dict of int32 [B, L] arrays: `tokens`, `segment_ids` (0 = padding) and
`positions` (restarting at 0 in each segment). Each loss returns sums, not means, so that
gradient accumulation over micro-batches and sharding give the exact batch mean.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from mlm_vs_clm.schedules import Objective


class LossSums(NamedTuple):
    loss: jnp.ndarray  # sum of token cross-entropies (f32)
    correct: jnp.ndarray  # number of argmax hits
    count: jnp.ndarray  # number of predicted tokens


def _xent_chunk(head_fn, h_BxCxD, targets_BxC, weights_BxC):
    logits_BxCxV = head_fn(h_BxCxD).astype(jnp.float32)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logit_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    hits_BxC = (jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC).astype(jnp.float32)
    return jnp.sum((lse_BxC - target_logit_BxC) * weights_BxC), jnp.sum(hits_BxC * weights_BxC)


def chunked_cross_entropy(head_fn: Callable, h_BxNxD, targets_BxN, weights_BxN, chunk_size: int) -> LossSums:
    """Cross-entropy of head_fn(h) against targets, `chunk_size` positions of every row at a time.

    Chunks run along the position axis (the batch axis stays sharded), and each chunk's logits
    are recomputed in the backward pass (jax.checkpoint), so one chunk of logits
    [B, chunk, V] is alive at a time, never [B, N, V].
    """
    B, n, D = h_BxNxD.shape
    chunk = max(1, min(chunk_size, n))
    num_chunks = math.ceil(n / chunk)
    pad = num_chunks * chunk - n
    if pad:
        h_BxNxD = jnp.pad(h_BxNxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxN = jnp.pad(targets_BxN, ((0, 0), (0, pad)))
        weights_BxN = jnp.pad(weights_BxN, ((0, 0), (0, pad)))
    fn = jax.checkpoint(lambda h, t, w: _xent_chunk(head_fn, h, t, w))
    if num_chunks == 1:
        loss, correct = fn(h_BxNxD, targets_BxN, weights_BxN)
    else:
        # [B, n, ...] -> [n/chunk, B, chunk, ...] so that scan walks the chunks.
        xs = (
            jnp.moveaxis(h_BxNxD.reshape(B, num_chunks, chunk, D), 1, 0),
            jnp.moveaxis(targets_BxN.reshape(B, num_chunks, chunk), 1, 0),
            jnp.moveaxis(weights_BxN.reshape(B, num_chunks, chunk), 1, 0),
        )

        def body(carry, x):
            l, c = fn(*x)
            return (carry[0] + l, carry[1] + c), None

        (loss, correct), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), xs)
    return LossSums(loss, correct, jnp.sum(weights_BxN))


def clm_targets(batch):
    """Next token inside each segment: targets [B, L] and weights (0 at a segment's last token)."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    next_seg = jnp.pad(seg[:, 1:], ((0, 0), (0, 1)))
    weights = ((seg > 0) & (next_seg == seg)).astype(jnp.float32)
    return next_tokens, weights


def clm_loss(encode_fn, head_fn, batch, chunk_size: int) -> LossSums:
    h_BxLxD = encode_fn(batch["tokens"], batch["segment_ids"], batch["positions"], "causal")
    targets_BxL, weights_BxL = clm_targets(batch)
    return chunked_cross_entropy(head_fn, h_BxLxD, targets_BxL, weights_BxL, chunk_size)


class Masking(NamedTuple):
    inputs: jnp.ndarray  # [B, L] tokens after replacement
    selected: jnp.ndarray  # [B, L] bool, the positions to predict
    indices: jnp.ndarray  # [B, M] positions of the selected tokens (M = static bound)
    valid: jnp.ndarray  # [B, M] bool, which of the M indices are real selections


def max_selected(mask_ratio: float, length: int) -> int:
    """Static bound on the number of selected tokens per row."""
    return max(1, min(length, math.ceil(mask_ratio * length)))


def draw_mask(rng, batch, mask_ratio: float, tokens_cfg, vocab_size: int, replacement: str = "mask") -> Masking:
    """Select round(mask_ratio * n) of the n eligible tokens of each row, uniformly.

    Eligible: real tokens (segment > 0) that are not special tokens. Replacement `mask` turns
    every selected token into the mask token; `80_10_10` does so for 80 %, puts a random
    non-special token at 10 % and keeps 10 %.
    """
    tokens, seg = batch["tokens"], batch["segment_ids"]
    B, L = tokens.shape
    special = jnp.asarray(tuple(tokens_cfg.special_ids), jnp.int32)
    eligible = (seg > 0) & ~jnp.isin(tokens, special)
    n_eligible = jnp.sum(eligible, axis=1)
    n_select = jnp.round(mask_ratio * n_eligible.astype(jnp.float32)).astype(jnp.int32)
    M = max_selected(mask_ratio, L)

    k_select, k_kind, k_random = jax.random.split(rng, 3)
    scores = jax.random.uniform(k_select, (B, L))
    scores = jnp.where(eligible, scores, 2.0)  # ineligible tokens sort last
    _, order_BxM = jax.lax.top_k(-scores, M)  # the M lowest scores
    valid_BxM = jnp.arange(M)[None, :] < n_select[:, None]
    rows = jnp.arange(B)[:, None]
    selected = jnp.zeros((B, L), bool).at[rows, order_BxM].set(valid_BxM)

    mask_tok = jnp.int32(tokens_cfg.mask_id)
    if replacement == "mask":
        inputs = jnp.where(selected, mask_tok, tokens)
    elif replacement == "80_10_10":
        u = jax.random.uniform(k_kind, (B, L))
        random_tok = jax.random.randint(k_random, (B, L), max(tokens_cfg.special_ids) + 1, vocab_size)
        replaced = jnp.where(u < 0.8, mask_tok, jnp.where(u < 0.9, random_tok, tokens))
        inputs = jnp.where(selected, replaced, tokens)
    else:
        raise ValueError(f"mlm.replacement: unknown policy {replacement!r} (use 'mask' or '80_10_10')")
    return Masking(inputs, selected, order_BxM, valid_BxM)


def mlm_loss(encode_fn, head_fn, batch, masking: Masking, sparse_head: bool, chunk_size: int) -> LossSums:
    inputs = masking.inputs
    h_BxLxD = encode_fn(inputs, batch["segment_ids"], batch["positions"], "bidirectional")
    if sparse_head:
        rows = jnp.arange(inputs.shape[0])[:, None]
        h_BxMxD = h_BxLxD[rows, masking.indices]
        targets_BxM = batch["tokens"][rows, masking.indices]
        weights_BxM = masking.valid.astype(jnp.float32)
        return chunked_cross_entropy(head_fn, h_BxMxD, targets_BxM, weights_BxM, chunk_size)
    weights_BxL = masking.selected.astype(jnp.float32)
    return chunked_cross_entropy(head_fn, h_BxLxD, batch["tokens"], weights_BxL, chunk_size)


def objective_loss(objective: Objective, encode_fn, head_fn, batch, rng, config) -> LossSums:
    """Loss sums of one objective on one (micro-)batch; `rng` draws the MLM mask."""
    if objective.kind == "clm":
        return clm_loss(encode_fn, head_fn, batch, config.loss_chunk_size)
    masking = draw_mask(
        rng, batch, objective.mask_ratio, config.tokens, config.model.vocab_size, config.mlm.replacement
    )
    return mlm_loss(encode_fn, head_fn, batch, masking, config.mlm.sparse_head, config.loss_chunk_size)
