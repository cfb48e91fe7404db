"""Where the `small` CLM step's time goes: the head loss alone, the encoder alone, and the encoder
rebuilt piece by piece on top of its bare matmuls.

  python tools/perf/parts.py

Prints forward + backward seconds (median of 5 interleaved rounds) of: the chunked head loss on
4,096 positions; the encoder (causal); a matmul-only stand-in with the encoder's projections;
the stand-in plus the attention core, RoPE, RMSNorm and SiLU in turn; and the attention core
alone per layer in two layouts (jax.nn.dot_product_attention, and heads-first einsums).
"""

import numpy as np

from mlm_vs_clm import bench
from mlm_vs_clm.kernels import host_memory

if __name__ == "__main__":
    host_memory.keep_mapped(respect_env=False)
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from mlm_vs_clm import model as M
    from mlm_vs_clm import objectives as O
    from mlm_vs_clm.config import load_config

    c = load_config("configs/pretrain.py:small")
    cfg = M.ModelConfig.from_config(c.model)
    B, L, D, F, V, S = 32, 128, cfg.hidden_size, cfg.ffn_size, cfg.vocab_size, cfg.num_layers
    N, H, T = cfg.num_heads, cfg.head_dim, 32 * 128
    batch = {k: jnp.asarray(v) for k, v in bench.synthetic_batch(B, L, V).items()}
    model = M.LanguageModel(cfg)
    params = nn.meta.unbox(M.init_params(cfg, jax.random.PRNGKey(0)))
    key = jax.random.split(jax.random.key(1), 8)
    kernel = jax.random.normal(key[0], (D, V)) * 0.02
    h = jax.random.normal(key[1], (B, L, D))
    targets = jax.random.randint(key[2], (B, L), 0, V)

    def head_loss(k, h):
        return O.chunked_cross_entropy(O.Head(k), h, targets, jnp.ones((B, L)), c.loss_chunk_size).loss

    def encoder(p):
        out = model.apply({"params": p}, batch["tokens"], batch["segment_ids"], batch["positions"], "causal",
                          method=model.encode)
        return jnp.sum(out ** 2)

    W = [[jax.random.normal(jax.random.fold_in(key[3], 7 * i + j), s) * 0.02
          for j, s in enumerate([(D, D)] * 4 + [(D, F), (D, F), (F, D)])] for i in range(S)]
    x0 = jax.random.normal(key[4], (T, D))
    cos, sin = M.rope_tables(batch["positions"], cfg)
    mask = M.attention_mask(batch["segment_ids"])

    def norm(x):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)

    def stand_in(attn, rope, rms, silu):
        def body(W, x):
            for wq, wk, wv, wo, wg, wu, wd in W:
                hh = norm(x) if rms else x
                q, k, v = hh @ wq, hh @ wk, hh @ wv
                if attn:
                    q, k, v = (a.reshape(B, L, N, H) for a in (q, k, v))
                    if rope:
                        q, k = M.apply_rope(q, cos, sin), M.apply_rope(k, cos, sin)
                    o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True).reshape(T, D)
                else:
                    o = q + k + v
                x = x + o @ wo
                hh = norm(x) if rms else x
                g = hh @ wg
                x = x + ((jax.nn.silu(g) if silu else g) * (hh @ wu)) @ wd
            return jnp.sum(x ** 2)
        return body

    q, k, v = (jax.random.normal(key[5 + i], (B, L, N, H)) for i in range(3))
    full_mask = mask & jnp.tril(jnp.ones((L, L), bool))[None, None]
    bias = jnp.where(full_mask, 0.0, -1e30).astype(jnp.float32)

    def attn_library(q, k, v):
        return jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True) ** 2)

    def attn_heads_first(q, k, v):
        qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, N, L, H]
        p = jax.nn.softmax(jnp.einsum("bnqh,bnkh->bnqk", qt, kt) * H ** -0.5 + bias, axis=-1)
        return jnp.sum(jnp.einsum("bnqk,bnkh->bnqh", p, vt) ** 2)

    cases = {
        "head loss (4,096 positions)": (jax.grad(head_loss, argnums=(0, 1)), (kernel, h)),
        "encoder": (jax.grad(encoder), (params,)),
        "stand-in: matmuls only": (jax.grad(stand_in(0, 0, 0, 0)), (W, x0)),
        "  + attention core": (jax.grad(stand_in(1, 0, 0, 0)), (W, x0)),
        "  + RoPE": (jax.grad(stand_in(1, 1, 0, 0)), (W, x0)),
        "  + RMSNorm": (jax.grad(stand_in(1, 1, 1, 0)), (W, x0)),
        "  + SiLU (the whole encoder's work)": (jax.grad(stand_in(1, 1, 1, 1)), (W, x0)),
        "attention, one layer: jax.nn.dot_product_attention": (jax.grad(attn_library, argnums=(0, 1, 2)), (q, k, v)),
        "attention, one layer: heads-first einsums": (jax.grad(attn_heads_first, argnums=(0, 1, 2)), (q, k, v)),
    }
    runners = {}
    for name, (fn, args) in cases.items():
        f = jax.jit(fn)
        jax.block_until_ready(f(*args))

        def run_one(f=f, args=args):
            jax.block_until_ready(f(*args))

        runners[name] = run_one
    times = bench.interleaved_times(runners, 0, 5)
    for name in runners:
        print(f"{name}: {np.median(times[name]) * 1e3:.1f} ms")
