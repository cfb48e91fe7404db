"""The benchmark's peer: the same model in Hugging Face transformers (PyTorch), in a process
of its own.

`peer_runner` builds `LlamaForCausalLM` with our dimensions and returns one AdamW training step;
`peer_process_runner` runs it in a child process (`_peer_child`) driven step by step over a
pipe, so that it takes turns with our steps in `bench.interleaved_times` without sharing our
heap or our cores' spinning threads.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import numpy as np

from mlm_vs_clm.kernels import host_memory


def peer_runner(config, batch_np: dict):
    """Hugging Face LlamaForCausalLM (PyTorch, f32 weights) with the same dimensions: AdamW, causal
    LM loss over whole rows, gradient clipping as ours, same B x L tokens, all CPU cores. With a
    16-bit compute dtype (`model.dtype`) its forward pass runs under `torch.autocast` in that
    dtype, PyTorch's counterpart of our f32 master weights with 16-bit compute."""
    import torch  # the peer's own stack: heavy, and only in the `hf` extra
    import transformers

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    m, o = config.model, config.optimizer
    hf_cfg = transformers.LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        head_dim=m.hidden_size // m.num_heads,
        max_position_embeddings=max(2048, batch_np["tokens"].shape[1]),
        rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        initializer_range=m.init_std,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM(hf_cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    ids = torch.from_numpy(batch_np["tokens"]).long()

    autocast_dtype = None if m.dtype == "float32" else getattr(torch, m.dtype)

    def run_one():
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    info = {"threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
            "attn_implementation": str(model.config._attn_implementation), "autocast": m.dtype}
    return run_one, info


def _peer_config(config) -> dict:
    """What `peer_runner` reads of a config, as JSON."""
    keys = {"model": ("vocab_size", "hidden_size", "ffn_size", "num_layers", "num_heads", "num_kv_heads",
                      "norm_eps", "rope_theta", "init_std", "dtype"),
            "optimizer": ("b1", "b2", "eps", "weight_decay", "clip_norm")}
    out = {group: {k: config[group][k] for k in names} for group, names in keys.items()}
    out["seed"] = config.seed
    return out


def peer_process_runner(config, batch_np: dict, folder: str, keep_host_memory: bool = False):
    """`peer_runner` in a process of its own, so that neither its allocations nor its OpenMP
    threads share this process's heap. `keep_host_memory=False` leaves the C library's
    allocator at its defaults (the peer as its users run it); True applies the same
    `host_memory.keep_mapped` settings as ours. Steps are driven over a pipe, so they take
    turns with ours in `interleaved_times`; each call returns the child's minor page faults
    for the step. Returns (run_one, info, close)."""
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "tokens.npy"), batch_np["tokens"])
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(_peer_config(config), fh)
    env = dict(os.environ, **{host_memory.ENV: "kept" if keep_host_memory else "default"})
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from mlm_vs_clm.bench.peer import _peer_child; _peer_child({folder!r})"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )

    def exited() -> RuntimeError:
        return RuntimeError(f"bench: the peer process exited (code {proc.wait()}); its error is above")

    def reply() -> str:
        while True:  # skip whatever else the child's libraries print to stdout
            line = proc.stdout.readline()
            if not line:
                raise exited()
            if _PEER_REPLY in line:  # a library's unterminated output may precede the reply
                return line[line.index(_PEER_REPLY) + len(_PEER_REPLY):].strip()

    def close():
        if proc.poll() is None:
            try:
                proc.stdin.close()
                proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        proc.stdout.close()

    try:
        info = json.loads(reply())
    except BaseException:
        close()
        raise

    def run_one():
        try:
            proc.stdin.write("step\n")
            proc.stdin.flush()
        except OSError as e:  # a broken pipe: the child is gone
            raise exited() from e
        return int(reply())

    return run_one, info, close


_PEER_REPLY = "peer-reply: "


def _peer_child(folder: str) -> None:
    """The child side of `peer_process_runner`: one step per `step` line on stdin, answering with
    the step's minor page faults; exits at end of input."""
    kept = host_memory.keep_mapped()  # as the parent asked, through MLM_VS_CLM_HOST_MEMORY
    import ml_collections  # after keep_mapped: the allocator is set before anything allocates

    with open(os.path.join(folder, "config.json")) as fh:
        config = ml_collections.ConfigDict(json.load(fh))
    run_one, info = peer_runner(config, {"tokens": np.load(os.path.join(folder, "tokens.npy"))})
    info["host_memory_kept_mapped"] = kept
    print(_PEER_REPLY + json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            continue
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run_one()
        print(f"{_PEER_REPLY}{resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}", flush=True)
