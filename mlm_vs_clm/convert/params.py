"""Our parameter tree <-> a Hugging Face Llama state dict, one tensor at a time.

Hugging Face Linear weights are [out, in]; our kernels are [in..., out...]:
  q_proj.weight [N*H, D] <-> q_proj.kernel [D, N, H]   (k/v: [K*H, D] <-> [D, K, H])
  o_proj.weight [D, N*H] <-> o_proj.kernel [N, H, D]
  gate/up_proj.weight [F, D] <-> [D, F];  down_proj.weight [D, F] <-> [F, D]
  lm_head.weight [V, D] <-> lm_head.kernel [D, V];  embed_tokens.weight [V, D] as is.
Both use the rotate-half RoPE layout, so q and k need no permutation. Layers are either
stacked under 'layers' (scan_layers, leading axis S) or separate ('layers_0', ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes a conversion needs (from our ModelConfig or a Hugging Face config)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def of(cls, cfg) -> Dims:
        return cls(*(getattr(cfg, f.name) for f in dataclasses.fields(cls)))


def _to_hf_in_out(kernel_DxO: np.ndarray) -> np.ndarray:
    """[D, out...] -> [prod(out), D]."""
    return kernel_DxO.reshape(kernel_DxO.shape[0], -1).T


def _layer_table(d: Dims):
    """(hf suffix, our module, hf shape, ours -> hf, hf -> ours) for the tensors of one block."""
    D, N, K, H, F = d.hidden_size, d.num_heads, d.num_kv_heads, d.head_dim, d.ffn_size
    return (
        ("input_layernorm.weight", "attn_norm", (D,), lambda x: x, lambda w: w),
        ("self_attn.q_proj.weight", "q_proj", (N * H, D), _to_hf_in_out, lambda w: w.T.reshape(D, N, H)),
        ("self_attn.k_proj.weight", "k_proj", (K * H, D), _to_hf_in_out, lambda w: w.T.reshape(D, K, H)),
        ("self_attn.v_proj.weight", "v_proj", (K * H, D), _to_hf_in_out, lambda w: w.T.reshape(D, K, H)),
        # o_proj: ours [N, H, D] -> [N*H, D] -> transposed [D, N*H]
        ("self_attn.o_proj.weight", "o_proj", (D, N * H), lambda x: x.reshape(N * H, D).T,
         lambda w: w.T.reshape(N, H, D)),
        ("post_attention_layernorm.weight", "mlp_norm", (D,), lambda x: x, lambda w: w),
        ("mlp.gate_proj.weight", "gate_proj", (F, D), lambda x: x.T, lambda w: w.T),
        ("mlp.up_proj.weight", "up_proj", (F, D), lambda x: x.T, lambda w: w.T),
        ("mlp.down_proj.weight", "down_proj", (D, F), lambda x: x.T, lambda w: w.T),
    )


def _leaf_name(module: str) -> str:
    return "scale" if module.endswith("norm") else "kernel"


def hf_shapes(d: Dims, with_head: bool = True) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name -> shape, in the order `iter_hf_tensors` yields them."""
    shapes = {"model.embed_tokens.weight": (d.vocab_size, d.hidden_size)}
    for i in range(d.num_layers):
        for suffix, _, shape, _, _ in _layer_table(d):
            shapes[f"model.layers.{i}.{suffix}"] = shape
    shapes["model.norm.weight"] = (d.hidden_size,)
    if with_head:
        shapes["lm_head.weight"] = (d.vocab_size, d.hidden_size)
    return shapes


def is_stacked(params) -> bool:
    return "layers" in params["encoder"]


def iter_hf_tensors(params, d: Dims, with_head: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (hf name, C-contiguous numpy array) one tensor at a time; only the tensor being
    yielded (and, for stacked layers, one stacked leaf) is materialised."""
    enc = params["encoder"]
    yield "model.embed_tokens.weight", np.ascontiguousarray(enc["embed"]["embedding"])
    stacked = is_stacked(params)
    table = _layer_table(d)
    if stacked:
        # Slice each stacked leaf per layer: layer-major order, one layer's tensor at a time.
        leaves = {module: enc["layers"][module][_leaf_name(module)] for _, module, _, _, _ in table}
    for i in range(d.num_layers):
        for suffix, module, shape, to_hf, _ in table:
            if stacked:
                x = np.asarray(leaves[module][i])
            else:
                x = np.asarray(enc[f"layers_{i}"][module][_leaf_name(module)])
            w = np.ascontiguousarray(to_hf(x))
            assert w.shape == shape, (suffix, w.shape, shape)
            yield f"model.layers.{i}.{suffix}", w
    yield "model.norm.weight", np.ascontiguousarray(enc["final_norm"]["scale"])
    if with_head:
        yield "lm_head.weight", np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T)


def params_from_hf(
    get: Callable[[str], np.ndarray],
    d: Dims,
    scan_layers: bool = True,
    tied: bool = False,
    dtype=np.float32,
) -> dict:
    """Builds our param tree from `get(hf_name) -> array` (read lazily, one tensor at a time).

    Stacked leaves are allocated once and filled layer by layer. With `tied`, the output head
    is a copy of the input embedding.
    """
    shapes = hf_shapes(d, with_head=False)

    def fetch(name):
        w = np.asarray(get(name))
        if w.shape != tuple(shapes[name]):
            raise ValueError(f"hf weights: {name} has shape {tuple(w.shape)}, the config implies {shapes[name]}")
        return w.astype(dtype, copy=False)

    embedding = fetch("model.embed_tokens.weight")
    encoder = {"embed": {"embedding": embedding}}
    table = _layer_table(d)
    if scan_layers:
        stacked = {}
        for i in range(d.num_layers):
            for suffix, module, _, _, from_hf in table:
                x = from_hf(fetch(f"model.layers.{i}.{suffix}"))
                if module not in stacked:
                    stacked[module] = np.empty((d.num_layers,) + x.shape, dtype)
                stacked[module][i] = x
        encoder["layers"] = {m: {_leaf_name(m): v} for m, v in stacked.items()}
    else:
        for i in range(d.num_layers):
            encoder[f"layers_{i}"] = {
                module: {_leaf_name(module): np.ascontiguousarray(from_hf(fetch(f"model.layers.{i}.{suffix}")))}
                for suffix, module, _, _, from_hf in table
            }
    encoder["final_norm"] = {"scale": fetch("model.norm.weight")}
    if tied:
        head = np.ascontiguousarray(embedding.T)
    else:
        w = np.asarray(get("lm_head.weight"))
        if w.shape != (d.vocab_size, d.hidden_size):
            raise ValueError(
                f"hf weights: lm_head.weight has shape {tuple(w.shape)}, expected {(d.vocab_size, d.hidden_size)}")
        head = np.ascontiguousarray(w.astype(dtype, copy=False).T)
    return {"encoder": encoder, "lm_head": {"kernel": head}}
