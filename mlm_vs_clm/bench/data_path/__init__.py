"""Benchmarks of the prepared-corpus path (numbers for docs/data.md; not a test).

    python -m mlm_vs_clm.bench.data_path [--dir=/tmp/prepare_bench] [--loader_rows=8192]
        [--batch=2304] [--seconds=5] [--text_mb=8,64] [--vocab=8000] [--shard_mb=4]

- loader: rows/s of process 0 of P = 1, 8, 64 simulated processes reading a synthetic
  prepared corpus at seq_len 2,048 (random tokens, uint16, from local disk / page cache),
  global batch `--batch` rows, and the bytes it reads per step;
- prepare: tokens/s of the bare tokenizer (`encode`, one core) on synthetic text, of
  `prepare_shard` on one shard of it in this process (one worker's rate), and of the whole
  command with 1 and 2 workers, with the peak RSS of its largest process, per corpus size;
- memory (`--memory_mb=512,4096`): the demo corpus's articles repeated, each copy in a new
  seeded order, to about that many MB of JSON lines; `prepare` with 1 and 2 workers (peak RSS
  of its largest process, and wall time), then a loader process reading that prepared corpus
  (peak RSS, rows/s);
- launch (`--launch=1,2,4`): `launch/local.sh P` trains `tiny` MLM-40 for 20 steps on one
  prepared corpus with P processes over the same 8 virtual CPU devices (8 / P each), and
  compares every step's loss with the one-process run's.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

from mlm_vs_clm.config import load_config
from mlm_vs_clm.data import prepare, prepared, rows, stream
from mlm_vs_clm.data.tokenizer import load_tokenizer, train_tokenizer


def write_synthetic_corpus(out: str, n_rows: int, seq_len: int, shards: int = 8, vocab: int = 32000, seed: int = 0):
    """A prepared corpus of random rows (2-4 segments each), readable by `prepared.Corpus`."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    infos = []
    for s in range(shards):
        n = n_rows // shards + (s < n_rows % shards)

        def gen(n=n):
            for _ in range(n):
                cuts = np.sort(rng.choice(np.arange(1, seq_len), size=int(rng.integers(1, 4)), replace=False))
                seg = np.zeros(seq_len, np.int32)
                for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, seq_len])):
                    seg[a:b] = i + 1
                yield rng.integers(5, vocab, seq_len).astype(np.int32), seg

        infos.append(prepare._write(os.path.join(out, f"train-{s:05d}.array_record"), gen(), "uint16"))
    manifest = {"format_version": rows.FORMAT_VERSION, "seq_len": seq_len, "token_dtype": "uint16",
                "tokenizer": {"fingerprint": "synthetic"},
                "train": {"rows": n_rows, "shards": infos}, "validation": {"rows": 0, "shards": []}}
    with open(os.path.join(out, rows.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return out


def loader_rows_per_second(corpus_dir: str, processes: int, batch: int, seconds: float, seq_len: int) -> dict:
    config = load_config("configs/pretrain.py:tiny", {"data.source": f"prepared:{corpus_dir}",
                                                      "train.batch_size": batch, "train.seq_len": seq_len})
    prepared._corpora.clear()
    it = prepared.train_iterator(config, 0, processes)
    first = next(it)
    local = first["tokens"].shape[0]
    record = os.path.getsize(os.path.join(corpus_dir, "train-00000.array_record"))
    rows_in_file = prepared.Corpus(corpus_dir).manifest["train"]["shards"][0]["rows"]
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        steps += 1
    elapsed = time.perf_counter() - start
    return {"processes": processes, "rows_per_step": local, "rows_per_second": steps * local / elapsed,
            "bytes_per_step": int(local * record / rows_in_file),
            "peak_rss_mb_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def synthetic_text(path: str, mb: float, seed: int = 0) -> str:
    """JSON lines of Zipf-distributed pseudo-words, ~`mb` MB, documents of 50-2,000 words."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    words = ["".join(rng.choice(letters, size=int(rng.integers(1, 10)))) for _ in range(20000)]
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    size = 0
    with open(path, "w") as f:
        while size < mb * 2**20:
            doc = " ".join(rng.choice(words, size=int(rng.integers(50, 2000)), p=weights)).capitalize() + "."
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            size += len(line)
    return path


def _tree_rss_kb(root: int) -> tuple[int, int]:
    """(sum, largest) of VmRSS in kB over `root` and its descendants, from /proc."""
    parent, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        parent[int(entry)] = int(fields.get("PPid", "0"))
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0])
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    values = [rss.get(p, 0) for p in tree]
    return sum(values), max(values, default=0)


def run_sampled(cmd: list[str], env: dict, interval: float = 0.05) -> tuple[subprocess.CompletedProcess, float, float]:
    """Runs `cmd`, sampling the RSS of its process tree: (result, peak total MB, peak of one process MB).
    Sampled from outside because a child's ru_maxrss starts at its parent's RSS (Linux keeps it across exec)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    total = single = 0
    while proc.poll() is None:
        t, m = _tree_rss_kb(proc.pid)
        total, single = max(total, t), max(single, m)
        time.sleep(interval)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), total / 1024, single / 1024


def demo_text(path: str, mb: float, seed: int = 0) -> str:
    """JSON lines of the demo corpus's pretraining articles, repeated (each copy in a new seeded
    order) to about `mb` MB."""
    from mlm_vs_clm.data import demo_corpus

    lines = [json.dumps({"text": t}) + "\n" for t in demo_corpus.pretrain_texts()]
    rng, size = np.random.default_rng(seed), 0
    with open(path, "w") as f:
        while size < mb * 2**20:
            for i in rng.permutation(len(lines)):
                f.write(lines[i])
                size += len(lines[i])
                if size >= mb * 2**20:
                    break
    return path


def _loader_subprocess(corpus: str, batch: int, seconds: float) -> dict:
    """Peak RSS and rows/s of a fresh process that reads `corpus` as process 0 of 1."""
    code = ("import json, time\nfrom mlm_vs_clm.config import load_config\n"
            "from mlm_vs_clm.data import prepared\nif __name__ == '__main__':\n"
            f"    c = load_config('configs/pretrain.py:tiny', {{'data.source': 'prepared:{corpus}', "
            f"'train.batch_size': {batch}, 'train.seq_len': prepared.Corpus({corpus!r}).seq_len}})\n"
            "    it = prepared.train_iterator(c, 0, 1)\n    next(it)\n    n, t = 0, time.perf_counter()\n"
            f"    while time.perf_counter() - t < {seconds}:\n        n += next(it)['tokens'].shape[0]\n"
            "    print('BENCH', json.dumps({'rows_per_second': n / (time.perf_counter() - t)}))\n")
    result, total, _ = _bench_subprocess(code)
    return {**result, "peak_rss_mb": total}


def _bench_subprocess(code: str) -> tuple[dict, float, float]:
    """Runs `code` (which prints one line 'BENCH <json>') in a fresh Python with the RSS of its
    process tree sampled: (the json, peak total MB, peak of one process MB)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    res, total, largest = run_sampled([sys.executable, "-c", code], env)
    line = [x for x in res.stdout.splitlines() if x.startswith("BENCH ")]
    if not line:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(line[0][len("BENCH "):]), total, largest


def memory(work: str, sizes_mb: list[float], vocab: int, seq_len: int, shard_mb: float, batch: int,
           seconds: float) -> list[dict]:
    """Peak RSS of prepare (1 and 2 workers) and of a loader process, per corpus size."""
    out = []
    for mb in sizes_mb:
        src = demo_text(os.path.join(work, f"demo{mb:g}.jsonl"), mb)
        tok_dir = os.path.join(work, "demo_tok")
        if not os.path.isdir(tok_dir):
            texts = list(stream.read_piece({"kind": "jsonl", "path": src, "start": 0, "end": 8 << 20}))
            train_tokenizer(texts, vocab, tok_dir)
        row = {"text_mb": mb, "bytes": os.path.getsize(src)}
        for workers in (1, 2):
            row[f"prepare_workers_{workers}"] = _prepare_subprocess(
                src, tok_dir, os.path.join(work, f"demo_out{workers}"), workers, shard_mb, seq_len)
        row["loader"] = _loader_subprocess(os.path.join(work, "demo_out1"), batch, seconds)
        for workers in (1, 2):
            shutil.rmtree(os.path.join(work, f"demo_out{workers}"), ignore_errors=True)
        os.remove(src)
        out.append(row)
        print(json.dumps({"memory": row}), flush=True)
    return out


def _prepare_subprocess(source: str, tok: str, out: str, workers: int, shard_mb: float, seq_len: int) -> dict:
    code = ("import json, time\nfrom mlm_vs_clm.data import prepare\nif __name__ == '__main__':\n"
            "    t = time.perf_counter()\n"
            f"    prepare.prepare({source!r}, {tok!r}, {seq_len}, {out!r}, workers={workers}, shard_mb={shard_mb}, "
            "progress=False)\n"
            "    print('BENCH', json.dumps(time.perf_counter() - t))\n")
    shutil.rmtree(out, ignore_errors=True)
    seconds, total_mb, largest_mb = _bench_subprocess(code)
    with open(os.path.join(out, rows.MANIFEST)) as f:
        m = json.load(f)
    tokens = m["train"]["tokens"] + m["validation"]["tokens"]
    # Steady state, without process start-up: tokens of the shards finished after the first
    # `workers` ones, over the time between those finishing times. A shard finishing inside that
    # window may have started before it, so the rate is only given with >= 4 shards per worker.
    done = sorted((os.path.getmtime(os.path.join(out, prepare.shard_names(i)[2])), info["tokens"] + v["tokens"])
                  for i, (info, v) in enumerate(zip(m["train"]["shards"], m["validation"]["shards"])))
    steady = (sum(t for _, t in done[workers:]) / (done[-1][0] - done[workers - 1][0])
              if len(done) >= 4 * workers and done[-1][0] > done[workers - 1][0] else float("nan"))
    return {"workers": workers, "seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
            "steady_tokens_per_second": steady, "shards": len(done),
            "peak_rss_mb": total_mb, "peak_rss_mb_largest_process": largest_mb}


def prepare_rates(work: str, text_mb: list[float], vocab: int, seq_len: int, shard_mb: float) -> list[dict]:
    out = []
    tok_dir = os.path.join(work, "tok")
    for mb in text_mb:
        src = synthetic_text(os.path.join(work, f"text{mb:g}.jsonl"), mb)
        if not os.path.isdir(tok_dir):
            texts = list(stream.read_piece({"kind": "jsonl", "path": src, "start": 0, "end": 8 << 20}))
            train_tokenizer(texts, vocab, tok_dir)
        tok = load_tokenizer(tok_dir)
        piece = {"kind": "jsonl", "path": src, "start": 0, "end": int(shard_mb * 2**20), "bytes": int(shard_mb * 2**20)}
        texts = list(stream.read_piece(piece))
        shard_out = os.path.join(work, "shard")
        settings = {"out": shard_out, "seq_len": seq_len, "seed": 0, "text_field": "text", "text_mode": "file",
                    "heldout_every": 64, "heldout_docs": 32, "token_dtype": "uint16"}
        bare = one_shard = 0.0
        for _ in range(3):  # interleaved, best of 3: the machine is shared, so timings are noisy
            t = time.perf_counter()
            bare = max(bare, sum(len(tok.encode(x)) + 2 for x in texts) / (time.perf_counter() - t))
            shutil.rmtree(shard_out, ignore_errors=True)
            os.makedirs(shard_out)
            tok.save(os.path.join(shard_out, rows.TOKENIZER_DIR))
            t = time.perf_counter()
            info = prepare.prepare_shard(0, [piece], settings)
            tokens = info["train"]["tokens"] + info["validation"]["tokens"]
            one_shard = max(one_shard, tokens / (time.perf_counter() - t))
        row = {"text_mb": mb, "bare_encode_tokens_per_second": bare, "prepare_shard_tokens_per_second": one_shard}
        for workers in (1, 2):
            row[f"workers_{workers}"] = _prepare_subprocess(src, tok_dir, os.path.join(work, f"out{workers}"),
                                                             workers, shard_mb, seq_len)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def launch_equality(work: str, counts: list[int], steps: int = 20, seq_len: int = 64) -> list[dict]:
    """Losses of `launch/local.sh P` for each P in `counts` on one prepared corpus, against the first P's."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    src = synthetic_text(os.path.join(work, "launch.jsonl"), 1.0, seed=1)
    tok_dir, corpus = os.path.join(work, "launch_tok"), os.path.join(work, "launch_prepared")
    shutil.rmtree(tok_dir, ignore_errors=True)
    shutil.rmtree(corpus, ignore_errors=True)
    train_tokenizer(list(stream.read_piece({"kind": "jsonl", "path": src, "start": 0, "end": 1 << 20})), 512, tok_dir)
    prepare.prepare(src, tok_dir, seq_len, corpus, workers=1, shard_mb=0.25, progress=False)
    results, reference = [], None
    for procs in counts:
        if 8 % procs:
            raise ValueError(f"--launch: {procs} processes do not divide the 8 devices")
        workdir = os.path.join(work, f"launch_{procs}")
        shutil.rmtree(workdir, ignore_errors=True)
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("MLM_VS_CLM_")}
        env.update(PYTHON=sys.executable, MLM_VS_CLM_CPU_DEVICES=str(8 // procs))
        flags = ["--config=configs/pretrain.py:tiny,mlm40", f"--workdir={workdir}",
                 f"--config.data.source=prepared:{corpus}", "--config.model.vocab_size=512",
                 "--config.train.batch_size=16", f"--config.train.seq_len={seq_len}", f"--config.train.steps={steps}",
                 "--config.train.log_every=1", "--config.train.eval_every=10", "--config.train.eval_batches=2",
                 "--config.train.checkpoint_every=10", "--config.train.progress=False",
                 "--config.mesh.data=2", "--config.mesh.fsdp=4"]
        start = time.perf_counter()
        res = subprocess.run(["bash", os.path.join(repo, "launch", "local.sh"), str(procs), *flags], cwd=repo,
                             env=env, capture_output=True, text=True, check=False)
        if res.returncode:
            raise RuntimeError(f"launch/local.sh {procs} failed: {res.stderr[-2000:]}")
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        losses = {r["step"]: r["loss"] for r in records if "loss" in r}
        evals = {r["step"]: r["val_mlm_loss"] for r in records if "val_mlm_loss" in r}
        row = {"processes": procs, "steps": len(losses), "seconds": time.perf_counter() - start,
               "final_loss": losses.get(steps), "val_mlm_loss": evals}
        if reference is None:
            reference = (losses, evals)
        else:
            row["losses_identical"] = losses == reference[0] and evals == reference[1]
            row["max_abs_loss_diff"] = max(abs(losses[s] - reference[0].get(s, float("nan"))) for s in losses)
        results.append(row)
        print(json.dumps({"launch": row}), flush=True)
    return results
