"""Analytic model FLOPs of one training step, per token.

Counted (a multiply-add = 2 FLOPs; training = forward + backward = 3x the forward matmuls):
- per layer and token: the q/k/v/o projections (2*D*(N+2K)*H + 2*N*H*D) and the SwiGLU MLP
  (3 * 2*D*F);
- attention scores QK^T and the weighted sum AV: 2 * 2*N*H per key attended. Keys per query
  are counted over the packed row of length L: all L keys for bidirectional attention, the
  average causal extent (L+1)/2 for causal attention. Segment masking inside a packed row is
  not subtracted (the kernels compute the whole row);
- the output head 2*D*V only at the positions actually predicted: every position for CLM,
  the static bound M = ceil(mask_ratio * L) per row for the sparse MLM head (all L without it).
Not counted: embeddings (a gather), norms, RoPE, softmax, the optimizer, and recomputation
(remat): they are hardware FLOPs, not model FLOPs. (The chunked loss recomputes nothing: its
custom VJP computes the head's gradients from the forward pass's logits.)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mlm_vs_clm.objectives import max_selected


@dataclasses.dataclass(frozen=True)
class StepFlops:
    per_token: float  # training FLOPs (forward + backward) per input token
    forward_per_token: float
    head_positions_per_row: int  # rows of the output head computed per row of length L
    attention_keys_per_query: float


def train_flops_per_token(model_cfg, seq_len: int, objective_kind: str, mask_ratio: float = 0.0,
                          sparse_head: bool = True, keys_per_query: float | None = None) -> StepFlops:
    """Model FLOPs per input token of one training step (see the module docstring).
    `keys_per_query` replaces the convention's keys per query (`keys_in_segments` counts only
    the keys inside each query's segment)."""
    if objective_kind not in ("clm", "mlm"):
        raise ValueError(f"flops: objective kind must be 'clm' or 'mlm', got {objective_kind!r}")
    D, F, V = model_cfg.hidden_size, model_cfg.ffn_size, model_cfg.vocab_size
    N, K = model_cfg.num_heads, model_cfg.num_kv_heads
    H = D // N
    L = seq_len
    projections = 2 * D * (N + 2 * K) * H + 2 * N * H * D
    mlp = 3 * 2 * D * F
    keys = (L + 1) / 2 if objective_kind == "clm" else float(L)
    if keys_per_query is not None:
        keys = float(keys_per_query)
    attention = 2 * 2 * N * H * keys
    per_layer = projections + mlp + attention
    if objective_kind == "mlm" and sparse_head:
        head_rows = max_selected(mask_ratio, L)
    else:
        head_rows = L
    head = 2 * D * V * head_rows / L
    forward = model_cfg.num_layers * per_layer + head
    return StepFlops(3 * forward, forward, head_rows, keys)


def keys_in_segments(segment_ids_BxL, causal: bool) -> float:
    """Keys per query (averaged over all B*L positions, padding included) that lie inside the
    query's own segment of a packed batch: the attention a kernel that skips every block
    between segments computes (cuDNN's packed layout, mlm_vs_clm/kernels/gpu.py)."""
    seg = np.asarray(segment_ids_BxL)
    pairs = 0.0
    for row in seg:
        _, lengths = np.unique(row[row > 0], return_counts=True)
        lengths = lengths.astype(np.float64)
        pairs += float(np.sum(lengths * (lengths + 1) / 2 if causal else lengths**2))
    return pairs / seg.size
