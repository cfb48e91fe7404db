"""CLM and MLM objectives on packed rows. Neither ever holds full f32 [B, L, V] logits.

A batch is a dict of int32 [B, L] arrays: `tokens`, `segment_ids` (0 = padding) and
`positions` (restarting at 0 in each segment). Each loss returns sums, not means, so that
gradient accumulation over micro-batches and sharding give the exact batch mean.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mlm_vs_clm.kernels import ops
from mlm_vs_clm.schedules import Objective


class LossSums(NamedTuple):
    loss: jnp.ndarray  # sum of token cross-entropies (f32)
    correct: jnp.ndarray  # number of argmax hits
    count: jnp.ndarray  # number of predicted tokens


class Head(NamedTuple):
    """The output head, a bias-free projection: logits [..., V] = h [..., D] @ kernel [D, V] in
    the compute dtype (as `LanguageModel.head`). The loss holds the kernel itself so that it can
    return the kernel's gradient from the forward pass."""

    kernel_DxV: jnp.ndarray
    dtype: Any = jnp.float32


REPLACEMENTS = ("mask", "80_10_10")  # mlm.replacement

def _chunk_stats(logits_TxV, targets_T):
    """f32 statistics of one chunk of logits: (logits, exp(z - max), its row sum, cross-entropy,
    hits).

    A hit is a target whose logit is the row's maximum (the argmax, up to exact ties): this
    reuses the max of the log-sum-exp, where a separate argmax pass over [T, V] (a variadic
    reduce) costs XLA's CPU backend as much as a third of the head matmul. An out-of-range
    target gives a NaN loss (so the step is skipped), as a gather out of range does.
    """
    logits_TxV = logits_TxV.astype(jnp.float32)
    max_T = jnp.max(logits_TxV, axis=-1)
    exp_TxV = jnp.exp(logits_TxV - max_T[:, None])
    sum_T = jnp.sum(exp_TxV, axis=-1)
    target_logit_T = jnp.take_along_axis(logits_TxV, targets_T[:, None], axis=-1, mode="fill")[:, 0]
    hits_T = (target_logit_T == max_T).astype(jnp.float32)
    return logits_TxV, exp_TxV, sum_T, max_T + jnp.log(sum_T) - target_logit_T, hits_T


def _xent_sums(dtype):
    """(kernel [D, V], h [n, T, D], targets [n, T], weights [n, T]) -> (loss sum, hit sum) over n
    chunks of T rows, with a custom VJP: under differentiation the forward pass also computes,
    chunk by chunk from the chunk's logits, the gradient of the loss sum w.r.t. h and the kernel
    (d logits = weights * (softmax - onehot)), so the backward pass only scales them by the
    incoming cotangent: three head matmuls per chunk (logits, d h, d kernel), none recomputed."""

    acc = ops.dot_accumulation()

    def logits_of(kernel_DxV, h_TxD):
        return jnp.matmul(h_TxD.astype(dtype), kernel_DxV.astype(dtype), preferred_element_type=acc)

    def primal(kernel_DxV, h_nxTxD, t_nxT, w_nxT):
        def body(carry, x):
            h_TxD, t_T, w_T = x
            *_, xent_T, hits_T = _chunk_stats(logits_of(kernel_DxV, h_TxD), t_T)
            return (carry[0] + jnp.sum(xent_T * w_T), carry[1] + jnp.sum(hits_T * w_T)), None

        (loss, correct), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), (h_nxTxD, t_nxT, w_nxT))
        return loss, correct

    def fwd(kernel_DxV, h_nxTxD, t_nxT, w_nxT):
        kernel_c = kernel_DxV.astype(dtype)

        def body(carry, x):
            loss, correct, dkernel_DxV = carry
            h_TxD, t_T, w_T = x
            logits_TxV, exp_TxV, sum_T, xent_T, hits_T = _chunk_stats(logits_of(kernel_DxV, h_TxD), t_T)
            vocab_TxV = jax.lax.broadcasted_iota(jnp.int32, logits_TxV.shape, 1)
            onehot_TxV = vocab_TxV == t_T[:, None]
            # softmax = exp(z - max) / sum: its row scale w / sum goes into the one pass that
            # writes d logits, so exp runs once per logit (a second exp(z - lse) pass over the
            # [T, V] logits is the head's largest elementwise cost on a CPU; docs/performance.md).
            dlogits_TxV = (exp_TxV * (w_T / sum_T)[:, None] - onehot_TxV * w_T[:, None]).astype(dtype)
            # [T, V] x [D, V] contracted over V: no transpose op feeds the dot, which would send a
            # bf16 dot to XLA's f32 path on a CPU (mlm_vs_clm/kernels/cpu.py).
            dh_TxD = jax.lax.dot_general(dlogits_TxV, kernel_c, (((1,), (1,)), ((), ())), preferred_element_type=acc)
            # h^T as its own [D, T] array: XLA's CPU backend then runs a plain [D, T] x [T, V] GEMM
            # instead of writing d logits a second time, transposed (docs/performance.md).
            # A 16-bit h^T must also stay out of the dot's reach for the dot to run in bf16
            # (part of what `python tools/perf/cpu_ops_ab.py` measures as the matmul version).
            hT_DxT = ops.transposed_operand(h_TxD, dtype)
            dkernel_DxV = dkernel_DxV + jnp.matmul(hT_DxT, dlogits_TxV, preferred_element_type=jnp.float32)
            carry = (loss + jnp.sum(xent_T * w_T), correct + jnp.sum(hits_T * w_T), dkernel_DxV)
            return carry, (dh_TxD.astype(h_TxD.dtype), xent_T)

        zeros = jnp.zeros(kernel_DxV.shape, jnp.float32)  # a sum over the batch: all-reduced if sharded
        (loss, correct, dkernel), (dh_nxTxD, xent_nxT) = jax.lax.scan(
            body, (jnp.float32(0), jnp.float32(0), zeros), (h_nxTxD, t_nxT, w_nxT)
        )
        return (loss, correct), (dkernel.astype(kernel_DxV.dtype), dh_nxTxD, xent_nxT)

    def bwd(res, cotangents):
        dkernel_DxV, dh_nxTxD, xent_nxT = res
        g = cotangents[0]  # d out / d loss sum; the hit count has no gradient
        scale = lambda x: (g * x).astype(x.dtype)
        return scale(dkernel_DxV), scale(dh_nxTxD), None, g * xent_nxT

    f = jax.custom_vjp(primal)
    f.defvjp(fwd, bwd)
    return f


def chunked_cross_entropy(head: Head, h_BxNxD, targets_BxN, weights_BxN, chunk_size: int) -> LossSums:
    """Cross-entropy of the head's logits against targets, at most `chunk_size` positions of every
    row at a time.

    Chunks run along the position axis (the batch axis stays sharded); one chunk of logits
    [B * chunk, V] is alive at a time, never [B, N, V]. Under differentiation each chunk's
    gradient is computed right after its logits (see `_xent_sums`).
    """
    B, n = h_BxNxD.shape[:2]
    num_chunks = math.ceil(n / max(1, min(chunk_size, n)))
    chunk = math.ceil(n / num_chunks)  # equal chunks of at most chunk_size: < num_chunks padded positions
    pad = num_chunks * chunk - n
    if pad:  # the last chunk is padded with weight-0 positions
        h_BxNxD = jnp.pad(h_BxNxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxN = jnp.pad(targets_BxN, ((0, 0), (0, pad)))
        weights_BxN = jnp.pad(weights_BxN, ((0, 0), (0, pad)))

    def chunks(x_BxN_):  # [B, n, ...] -> [n/chunk, B * chunk, ...] so that scan walks the chunks
        x = jnp.moveaxis(x_BxN_.reshape(B, num_chunks, chunk, *x_BxN_.shape[2:]), 1, 0)
        return x.reshape(num_chunks, B * chunk, *x_BxN_.shape[2:])

    loss, correct = _xent_sums(jnp.dtype(head.dtype))(
        head.kernel_DxV, chunks(h_BxNxD), chunks(targets_BxN), chunks(weights_BxN.astype(jnp.float32))
    )
    return LossSums(loss, correct, jnp.sum(weights_BxN))


def clm_targets(batch):
    """Next token inside each segment: targets [B, L] and weights (0 at a segment's last token)."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    next_seg = jnp.pad(seg[:, 1:], ((0, 0), (0, 1)))
    weights = ((seg > 0) & (next_seg == seg)).astype(jnp.float32)
    return next_tokens, weights


def clm_loss(encode_fn, head: Head, batch, chunk_size: int) -> LossSums:
    h_BxLxD = encode_fn(batch["tokens"], batch["segment_ids"], batch["positions"], "causal")
    targets_BxL, weights_BxL = clm_targets(batch)
    return chunked_cross_entropy(head, h_BxLxD, targets_BxL, weights_BxL, chunk_size)


class Masking(NamedTuple):
    inputs: jnp.ndarray  # [B, L] tokens after replacement
    selected: jnp.ndarray  # [B, L] bool, the positions to predict
    indices: jnp.ndarray  # [B, M] positions of the selected tokens (M = static bound)
    valid: jnp.ndarray  # [B, M] bool, which of the M indices are real selections


def max_selected(mask_ratio: float, length: int) -> int:
    """Static bound on the number of selected tokens per row."""
    return max(1, min(length, math.ceil(mask_ratio * length)))


def random_non_special(rng, shape, special_ids, vocab_size: int) -> jnp.ndarray:
    """Token ids drawn uniformly from the non-special ids below `vocab_size`, wherever the special
    ids lie (the lowest ids, or Llama-3's reserved ids at the top, or a mask token appended last).

    Draws r in [0, V - n) for the n special ids s_0 < ... < s_{n-1} below V, then steps over them:
    the r-th non-special id is r + #{i : s_i - i <= r} (s_i - i non-special ids lie below s_i).
    """
    special = sorted({int(s) for s in special_ids if 0 <= int(s) < vocab_size})
    if len(special) >= vocab_size:
        raise ValueError(f"tokens.special_ids: every id of the {vocab_size}-token vocabulary is special")
    r = jax.random.randint(rng, shape, 0, vocab_size - len(special))
    if not special:
        return r
    below_n = jnp.asarray([s - i for i, s in enumerate(special)], jnp.int32)  # non-decreasing
    return r + jnp.searchsorted(below_n, r, side="right").astype(r.dtype)


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
        random_tok = random_non_special(k_random, (B, L), tokens_cfg.special_ids, vocab_size)
        replaced = jnp.where(u < 0.8, mask_tok, jnp.where(u < 0.9, random_tok, tokens))
        inputs = jnp.where(selected, replaced, tokens)
    else:
        raise ValueError(f"mlm.replacement: unknown policy {replacement!r} (one of {', '.join(REPLACEMENTS)})")
    return Masking(inputs, selected, order_BxM, valid_BxM)


def mlm_loss(encode_fn, head: Head, batch, masking: Masking, sparse_head: bool, chunk_size: int) -> LossSums:
    inputs = masking.inputs
    h_BxLxD = encode_fn(inputs, batch["segment_ids"], batch["positions"], "bidirectional")
    if sparse_head:
        rows = jnp.arange(inputs.shape[0])[:, None]
        h_BxMxD = h_BxLxD[rows, masking.indices]
        targets_BxM = batch["tokens"][rows, masking.indices]
        weights_BxM = masking.valid.astype(jnp.float32)
        return chunked_cross_entropy(head, h_BxMxD, targets_BxM, weights_BxM, chunk_size)
    weights_BxL = masking.selected.astype(jnp.float32)
    return chunked_cross_entropy(head, h_BxLxD, batch["tokens"], weights_BxL, chunk_size)


def objective_masking(objective: Objective, batch, rng, config) -> Masking | None:
    """The MLM mask of `batch` drawn with `rng` (None for CLM). A train step draws it once for the
    whole batch and splits it into micro-batches with the batch, so the masked tokens do not
    depend on `train.grad_accum_steps`."""
    if objective.kind == "clm":
        return None
    return draw_mask(rng, batch, objective.mask_ratio, config.tokens, config.model.vocab_size, config.mlm.replacement)


def objective_loss(objective: Objective, encode_fn, head: Head, batch, masking: Masking | None, config) -> LossSums:
    """Loss sums of one objective on one (micro-)batch; `masking` (its rows) from `objective_masking`."""
    if objective.kind == "clm":
        return clm_loss(encode_fn, head, batch, config.loss_chunk_size)
    return mlm_loss(encode_fn, head, batch, masking, config.mlm.sparse_head, config.loss_chunk_size)
