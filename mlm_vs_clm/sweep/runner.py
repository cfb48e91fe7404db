"""The sweep's machinery (no flags: importable from other tools): the plan on disk, one run
(prepare a branch, train, fine-tune, record), the local and print backends, and collection.
The command line is sweep/__main__.py; the grid is plan.py; the child processes, children.py.
Each invocation of a run adds its training time to DIR/runs/ID/wall_s.json (`add_wall`: run_one
here, `sweep add-wall` in the slurm stage scripts), whose sum is the run's `wall_s`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shlex
import shutil
import sys
import time

from mlm_vs_clm.config import ConfigError
from mlm_vs_clm.sweep import children
from mlm_vs_clm.sweep import plan as sweep_plan
from mlm_vs_clm.sweep.children import run_child
from mlm_vs_clm.sweep.plan import is_done, run_dir

PLAN_FILE = "plan.json"
WALL_FILE = "wall_s.json"

# ---------------------------------------------------------------- one run


def prepare(workdir: str, run: dict) -> None:
    """A branch run with no checkpoint of its own starts from a copy of its trunk's
    checkpoint at the switch step (hard links where possible), with the trunk's tokenizer and
    metrics up to that step; from scratch if the trunk finished without that checkpoint."""
    if not run["branch_from"]:
        return
    rdir = run_dir(workdir, run["id"])
    ckpts = os.path.join(rdir, "checkpoints")
    if os.path.isdir(ckpts) and any(name.isdigit() for name in os.listdir(ckpts)):
        return  # resumed earlier (or finished): its own checkpoints win
    trunk = run_dir(workdir, run["branch_from"])
    src = os.path.join(trunk, "checkpoints", str(run["branch_step"]))
    if not os.path.isdir(src) and is_done(workdir, run["branch_from"]):
        print(f"sweep: note: {run['id']}: its trunk {run['branch_from']} finished without a checkpoint at step "
              f"{run['branch_step']}; it trains from scratch", flush=True)
        return
    if not os.path.isdir(src):
        raise ConfigError(
            f"run {run['id']}: trunk {run['branch_from']} has no checkpoint at step {run['branch_step']} ({src})"
        )
    os.makedirs(ckpts, exist_ok=True)
    tmp = os.path.join(ckpts, f".copy-{run['branch_step']}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=_link_or_copy)
    os.replace(tmp, os.path.join(ckpts, str(run["branch_step"])))  # atomic: never a half copy
    if os.path.isdir(os.path.join(trunk, "tokenizer")) and not os.path.isdir(os.path.join(rdir, "tokenizer")):
        shutil.copytree(os.path.join(trunk, "tokenizer"), os.path.join(rdir, "tokenizer"))
    metrics = os.path.join(trunk, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics) as f:
            kept = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= run["branch_step"]]
        with open(os.path.join(rdir, "metrics.jsonl"), "w") as f:
            f.writelines(kept)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def finish(workdir: str, run: dict, sweep: dict, wall_s: float) -> dict:
    """After training: the fine-tuning suite (if any), then DIR/runs/ID/done.json."""
    rdir = run_dir(workdir, run["id"])
    final = final_metrics(rdir)
    if final.get("step") != run["steps"]:
        raise RuntimeError(f"run {run['id']}: training has not reached step {run['steps']} "
                           f"(last evaluation at step {final.get('step')}); rerun it to resume")
    if sweep["finetune"]["config"] and run["in_grid"]:
        args = ["mlm_vs_clm.finetune", f"--config={sweep['finetune']['config']}", f"--config.checkpoint={rdir}",
                f"--workdir={os.path.join(rdir, 'finetune')}", "--config.progress=False"]
        args += [f"--config.{k}={v}" for k, v in sweep_plan.parse_overrides(sweep["finetune"]["overrides"])]
        run_child(args, os.path.join(rdir, "finetune.log"))
    record = {"wall_s": wall_total(rdir) + wall_s, **final, "args_hash": run.get("args_hash")}
    tmp = os.path.join(rdir, "done.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(rdir, "done.json"))
    return record


def wall_total(rdir: str) -> float:
    """Seconds of training recorded by the run's earlier invocations (DIR/runs/ID/wall_s.json)."""
    try:
        with open(os.path.join(rdir, WALL_FILE)) as f:
            return float(sum(json.load(f)))
    except (OSError, ValueError, TypeError):
        return 0.0


def add_wall(rdir: str, seconds: float) -> None:
    """Appends one invocation's training time to DIR/runs/ID/wall_s.json (atomically)."""
    os.makedirs(rdir, exist_ok=True)  # gone if its train failed at start-up (an empty folder it made)
    path = os.path.join(rdir, WALL_FILE)
    try:
        with open(path) as f:
            times = [float(x) for x in json.load(f)]
    except (OSError, ValueError, TypeError):
        times = []
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(times + [round(seconds, 3)], f)
    os.replace(tmp, path)


def final_metrics(rdir: str) -> dict:
    last = {}
    path = os.path.join(rdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "val_mlm_loss" in rec:
                last = rec
    return {k: last.get(k) for k in ("step", "val_mlm_loss", "val_clm_loss", "val_mlm_accuracy", "val_clm_accuracy")}


def plan_run(saved: dict, workdir: str, run_id: str) -> dict:
    runs = {r["id"]: r for r in saved["runs"]}
    if run_id not in runs:
        raise ConfigError(f"run: {run_id!r} is not in {os.path.join(workdir, PLAN_FILE)}")
    return runs[run_id]


def args_hash(run: sweep_plan.Run, sweep) -> str:
    """A hash of what decides a run's results: its config, overrides (not the checkpoints it
    keeps for branches) and fine-tuning suite; no paths, so a moved sweep keeps its runs."""
    overrides = [(k, v) for k, v in run.overrides(sweep_plan.parse_overrides(sweep.overrides))
                 if k != "train.keep_steps"]
    key = [sweep.base, run.size.preset, run.schedule, overrides, sweep.finetune.config,
           list(sweep_plan.parse_overrides(sweep.finetune.overrides))]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def done_record(workdir: str, run: dict) -> dict | None:
    """The run's done.json, None if it has none; ConfigError if it was trained with other
    arguments (a done.json written before args_hash existed is accepted)."""
    path = os.path.join(run_dir(workdir, run["id"]), "done.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record.get("args_hash") not in (None, run["args_hash"]):
        raise ConfigError(f"run {run['id']}: finished with other training or fine-tuning arguments than this sweep's "
                          f"({path}); use a new --workdir, or move {run_dir(workdir, run['id'])} away to retrain it")
    return record


def run_one(workdir: str, run_id: str) -> dict:
    """Prepare, train, fine-tune and record one run of the plan (skipped if done)."""
    saved = load_plan(workdir)
    run = plan_run(saved, workdir, run_id)
    rdir = run_dir(workdir, run_id)
    record = done_record(workdir, run)
    if record is not None:
        return record
    os.makedirs(rdir, exist_ok=True)
    prepare(workdir, run)
    start = time.time()
    try:
        run_child(["mlm_vs_clm.train", *run["train_args"], "--config.train.progress=False"],
                    os.path.join(rdir, "train.log"))
    finally:  # every invocation counts, also one that failed or was stopped
        add_wall(rdir, time.time() - start)
    return finish(workdir, run, saved["sweep"], 0.0)


# ---------------------------------------------------------------- the plan on disk


def write_plan(workdir: str, sweep) -> list[dict]:
    """Plans the sweep and writes DIR/plan.json. Checks finished runs against it (done_record),
    and a branch whose trunk finished without its switch checkpoint (the schedule was added
    later) trains from scratch instead: the same result, without the saving."""
    runs = sweep_plan.plan(sweep)
    common = sweep_plan.parse_overrides(sweep.overrides)
    for r in runs:
        ckpt = os.path.join(run_dir(workdir, r.branch_from), "checkpoints", str(r.branch_step))
        if r.branch_from and is_done(workdir, r.branch_from) and not os.path.isdir(ckpt) \
                and not is_done(workdir, r.id):
            print(f"sweep: note: {r.id}: its trunk {r.branch_from} finished without a checkpoint at step "
                  f"{r.branch_step}; it trains from scratch", flush=True)
            r.branch_from, r.branch_step = "", 0
    records = []
    for r in runs:
        cfg = r.load_config(sweep.base, common)
        records.append({
            "id": r.id, "size": r.size.label, "steps": r.steps, "schedule": r.schedule, "seed": r.seed,
            "clm_steps": r.clm_steps, "clm_fraction": r.clm_fraction, "mask_ratio": r.mask_ratio,
            "branch_from": r.branch_from, "branch_step": r.branch_step, "in_grid": r.in_grid,
            "train_args": r.train_args(sweep.base, run_dir(os.path.abspath(workdir), r.id), common),
            "args_hash": args_hash(r, sweep),
            "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len,
            **_compute(cfg, r),
        })
    _net_savings(records)
    for rec in records:
        done_record(workdir, rec)
    saved_sweep = json.loads(sweep.to_json())
    saved_sweep["base"] = sweep_plan.resolve_config(sweep.base)
    if saved_sweep["finetune"]["config"]:
        saved_sweep["finetune"]["config"] = sweep_plan.resolve_config(saved_sweep["finetune"]["config"])
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, PLAN_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"sweep": saved_sweep, "runs": records}, f, indent=1)
    os.replace(tmp, os.path.join(workdir, PLAN_FILE))
    return records


def _compute(cfg, run) -> dict:
    """Parameters (non-embedding: blocks and final norm, neither input embedding nor head) and
    analytic training FLOPs of the whole run (the sum over its schedule's phases) and of the
    CLM prefix a branch does not train."""
    from mlm_vs_clm import schedules
    from mlm_vs_clm.flops import train_flops_per_token
    from mlm_vs_clm.model import ModelConfig

    m = ModelConfig.from_config(cfg.model)
    D, H = m.hidden_size, m.hidden_size // m.num_heads
    per_layer = D * (m.num_heads + 2 * m.num_kv_heads) * H + m.num_heads * H * D + 3 * D * m.ffn_size + 2 * D
    params = m.num_layers * per_layer + D
    L, tokens_per_step = cfg.train.seq_len, cfg.train.batch_size * cfg.train.seq_len
    sched = schedules.objective_schedule(run.schedule, run.steps, cfg.mlm.mask_ratio)
    total = 0.0
    for start, end, obj in zip(sched.starts, sched.starts[1:] + (run.steps,), sched.objectives):
        per_token = train_flops_per_token(m, L, obj.kind, obj.mask_ratio, cfg.mlm.sparse_head).per_token
        total += per_token * tokens_per_step * (end - start)
    prefix = train_flops_per_token(m, L, "clm").per_token * tokens_per_step * run.branch_step
    return {"params": params, "tokens": tokens_per_step * run.steps, "flops": total,
            "saved_flops": prefix if run.branch_from else 0.0}


def _net_savings(records: list[dict]) -> None:
    """A trunk added only to be branched from costs compute the grid did not ask for: each of its
    branches' saved_flops gives back its share (in proportion to its prefix) of that cost."""
    for trunk in (r for r in records if not r["in_grid"]):
        branches = [r for r in records if r["branch_from"] == trunk["id"]]
        prefixes = sum(r["saved_flops"] for r in branches)
        for r in branches:
            r["saved_flops"] -= trunk["flops"] * r["saved_flops"] / prefixes


def branch_saving(runs: list[dict]) -> tuple[float, float]:
    """(net FLOPs branching saves, FLOPs of the grid's runs trained from scratch)."""
    return sum(r["saved_flops"] for r in runs), sum(r["flops"] for r in runs if r["in_grid"])


def load_plan(workdir: str) -> dict:
    path = os.path.join(workdir, PLAN_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no {PLAN_FILE} in {workdir} (run the sweep with --config first)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"sweep: {path} is corrupt ({e}); run the sweep with --config again") from e


# ---------------------------------------------------------------- backends


def run_local(workdir: str, runs: list[dict], parallel: int = 1) -> list[str]:
    """Runs every unfinished run here; returns the ids that failed."""
    todo = [r for r in runs if not is_done(workdir, r["id"])]
    skipped = len(runs) - len(todo)
    if skipped:
        print(f"sweep: {skipped} of {len(runs)} runs already done, skipped", flush=True)
    failed: dict[str, str] = {}
    pending = {r["id"]: r for r in todo}
    running: dict = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        while pending or running:
            for rid, r in list(pending.items()):
                if len(running) >= max(1, parallel) or children.stopping():
                    break
                dep = r["branch_from"]
                if dep and dep in failed:
                    failed[rid] = f"its trunk {dep} failed"
                    del pending[rid]
                elif not dep or is_done(workdir, dep) or dep not in {x["id"] for x in runs}:
                    print(f"sweep: start {rid}" + (f" (from {dep} at step {r['branch_step']})" if dep else ""),
                          flush=True)
                    running[pool.submit(run_one, workdir, rid)] = rid
                    del pending[rid]
            if not running:
                if pending and not children.stopping():  # only branches of trunks neither done nor running
                    for rid in pending:
                        failed[rid] = "its trunk did not finish"
                break
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                rid = running.pop(fut)
                try:
                    rec = fut.result()
                    print(f"sweep: done  {rid}: val_mlm_loss {rec.get('val_mlm_loss')}, "
                          f"val_clm_loss {rec.get('val_clm_loss')}, {rec['wall_s']:.0f} s", flush=True)
                except children.SweepStopped:
                    print(f"sweep: stopped {rid} (its checkpoint is saved)", flush=True)
                except Exception as e:  # noqa: BLE001 - one failed run does not stop the sweep
                    failed[rid] = str(e)
                    print(f"sweep: FAILED {rid}: {e}", file=sys.stderr, flush=True)
    for rid, why in failed.items():
        print(f"sweep: not done: {rid}: {why}", file=sys.stderr)
    return list(failed)


def commands(workdir: str, runs: list[dict]) -> list[tuple[int, str]]:
    """(stage, shell command) per unfinished run: stage 2 runs need their stage-1 trunk done."""
    out = []
    for r in runs:
        if is_done(workdir, r["id"]):
            continue
        cmd = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "mlm_vs_clm.sweep", "run-one",
                                                f"--workdir={os.path.abspath(workdir)}", f"--run={r['id']}"))
        out.append((2 if r["branch_from"] else 1, cmd))
    return out


def print_backend(workdir: str, runs: list[dict]) -> None:
    cmds = commands(workdir, runs)
    for stage in (1, 2):
        lines = [c for s, c in cmds if s == stage]
        if lines:
            print(f"# stage {stage}: {len(lines)} runs" + (" (each after its trunk in stage 1)" if stage == 2 else ""))
            print("\n".join(lines))
    print(f"# then: {sys.executable} -m mlm_vs_clm.sweep analyze --workdir={os.path.abspath(workdir)}")


# ---------------------------------------------------------------- collect


def collect(workdir: str) -> str:
    from mlm_vs_clm.sweep.results import write_tables

    return write_tables(workdir, load_plan(workdir))


def analyze(workdir: str, loss: str = "auto", fixed_E: float | None = None) -> None:
    from mlm_vs_clm.sweep import analysis as sweep_analysis

    print(f"sweep: wrote {collect(workdir)}")
    sweep_analysis.main(workdir, loss, fixed_E)
