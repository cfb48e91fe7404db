"""A sweep's grid -> the list of pretraining runs, with the CLM trunks that branches reuse.

A sweep config (configs/sweeps/*.py) declares:
  base       pretraining config file, `configs/pretrain.py`
  sizes      ("tiny", "tiny-d128=tiny:model.hidden_size=128,model.ffn_size=384", ...):
             a preset name, or LABEL=PRESET:KEY=VALUE,... (a dimension scaling of a preset)
  steps      step budgets, (100, 300)
  schedules  objective schedules, ("mlm40", "clm", "clm25_mlm40", "clm10k_mlm40", ...)
             (schedules.py syntax)
  seeds      (0,)
  blocks     optional: the grid as a union of such crosses, (dict(sizes=..., steps=...,
             schedules=...), ...); a key a block leaves out takes the top-level value (e.g.
             seeds). A run is (size label, steps, schedule name, seed): one in several blocks is
             planned once. Without blocks, the top-level keys are the only block.
  overrides  ("train.eval_batches=2", ...) applied to every run
  keep_fractions  (0.25, 0.5) keeps every run's checkpoints at these fractions of its steps
             (intermediate checkpoints, e.g. for data-efficiency curves); () = none
  branch     'resume': biphasic runs continue from their CLM trunk's checkpoint kept at the
             switch step (the trunk is the pure CLM run of the same size, budget and seed;
             when the grid lacks it, it is added only if it saves compute: if the branches'
             CLM prefixes add up to more steps than the trunk); 'none': every run trains
             from scratch
  finetune   config ('' = none), overrides: a fine-tuning suite run on each final checkpoint

Why branching is exact: a run's first S steps depend only on the seed, the data stream, the
objective at those steps and a learning-rate schedule that is a function of the step and
the total steps (the re-warmup at a switch acts only after it). A CLM-then-MLM run and the
pure CLM run of the same budget therefore agree bit for bit up to the switch, and resuming
the CLM run's checkpoint at the switch (optimizer and data iterator included) is the same
as training the prefix again (tests/test_sweep.py checks the losses are identical).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re

from mlm_vs_clm import schedules
from mlm_vs_clm.config import REPO_ROOT, ConfigError, load_config

BRANCH_MODES = ("resume", "none")


@dataclasses.dataclass(frozen=True)
class Size:
    label: str
    preset: str
    overrides: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass
class Run:
    id: str
    size: Size
    steps: int
    schedule: str
    seed: int
    clm_steps: int  # steps trained with CLM (the prefix for a biphasic schedule)
    mask_ratio: float  # of the first MLM phase; 0 for pure CLM
    branch_from: str = ""  # the trunk run whose checkpoint at `branch_step` this run resumes
    branch_step: int = 0
    keep_steps: tuple[int, ...] = ()  # checkpoints a trunk keeps for its branches
    in_grid: bool = True  # False: a trunk added only to be branched from

    @property
    def clm_fraction(self) -> float:
        return self.clm_steps / self.steps

    def config_spec(self, base: str) -> str:
        return f"{resolve_config(base)}:{self.size.preset},{self.schedule}"

    def overrides(self, common: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        """(key, value-as-typed-on-a-command-line) pairs, later ones win."""
        out = list(common) + list(self.size.overrides)
        out += [("seed", str(self.seed)), ("train.steps", str(self.steps))]
        if self.keep_steps:
            out.append(("train.keep_steps", "(" + ",".join(str(s) for s in self.keep_steps) + ",)"))
        return out

    def train_args(self, base: str, workdir: str, common) -> list[str]:
        return [f"--config={self.config_spec(base)}", f"--workdir={workdir}"] + [
            f"--config.{k}={v}" for k, v in self.overrides(common)
        ]

    def load_config(self, base: str, common):
        return load_config(self.config_spec(base), {k: parse_value(v) for k, v in self.overrides(common)})


def resolve_config(spec: str) -> str:
    """`configs/pretrain.py:tiny` -> the same with the file's absolute path, resolved as load_config
    does (the cwd, else the repo root), so that training subprocesses and SLURM jobs find it
    from any directory."""
    path, colon, arg = spec.partition(":")
    if not path or os.path.isabs(path):
        return spec
    path = os.path.abspath(path) if os.path.exists(path) else os.path.join(REPO_ROOT, path)
    return path + colon + arg


def parse_value(text: str):
    """A command-line value as ml_collections would read it: a Python literal, else a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_size(spec: str) -> Size:
    label, eq, rest = spec.partition("=")
    if not eq:
        return Size(spec.strip(), spec.strip())
    preset, _, kvs = rest.partition(":")
    pairs = []
    for kv in filter(None, (p.strip() for p in kvs.split(","))):
        k, eq2, v = kv.partition("=")
        if not eq2 or not k:
            raise ConfigError(f"sizes: {spec!r}: expected LABEL=PRESET:KEY=VALUE,..., got {kv!r}")
        pairs.append((k.strip(), v.strip()))
    return Size(label.strip(), preset.strip(), tuple(pairs))


def parse_overrides(items) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        k, eq, v = str(item).partition("=")
        if not eq or not k.strip():
            raise ConfigError(f"overrides: expected KEY=VALUE, got {item!r}")
        out.append((k.strip().removeprefix("--config."), v.strip()))
    return tuple(out)


def _clm_prefix(schedule: str, steps: int, mask_ratio: float) -> tuple[int, float]:
    """(CLM steps at the start, mask ratio of the first MLM phase) of a schedule; plain `mlm`
    phases mask `mask_ratio` (the config's mlm.mask_ratio)."""
    try:
        sched = schedules.objective_schedule(schedule, steps, mask_ratio)
    except ValueError as e:
        raise ConfigError(f"schedules: {e}") from e
    objs = sched.objectives
    if objs[0].kind != "clm":
        return 0, objs[0].mask_ratio
    if len(objs) == 1:
        return steps, 0.0
    if any(o.kind == "clm" for o in objs[1:]):
        raise ConfigError(f"schedules: {schedule!r}: only one CLM phase, at the start, is supported")
    return sched.starts[1], objs[1].mask_ratio


def run_dir(workdir: str, run_id: str) -> str:
    return os.path.join(workdir, "runs", run_id)


def is_done(workdir: str, run_id: str) -> bool:
    """A run is done when DIR/runs/ID/done.json exists (written last, atomically)."""
    return os.path.isfile(os.path.join(run_dir(workdir, run_id), "done.json"))


def run_id(size: str, steps: int, schedule: str, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{size}_{steps}_{schedule}_s{seed}")


GRID_KEYS = ("sizes", "steps", "schedules", "seeds")


def grid_blocks(sweep) -> list[tuple[str, dict]]:
    """(where, {sizes, steps, schedules, seeds}) per block of the grid: `sweep.blocks`, each
    block's missing keys taken from the top level, or the top-level keys as the only block.
    `where` prefixes error messages ('' or 'blocks[1]: ')."""
    blocks = tuple(sweep.get("blocks", ()) or ())
    if not blocks:
        return [("", {k: sweep.get(k, ()) for k in GRID_KEYS})]
    out = []
    for i, block in enumerate(blocks):
        where = f"blocks[{i}]: "
        if not hasattr(block, "keys"):
            raise ConfigError(f"{where}expected dict({'=..., '.join(GRID_KEYS)}=...), got {block!r}")
        unknown = sorted(set(block.keys()) - set(GRID_KEYS))
        if unknown:
            raise ConfigError(f"{where}unknown key {unknown[0]!r} (a block has {', '.join(GRID_KEYS)})")
        out.append((where, {k: block[k] if k in block else sweep.get(k, ()) for k in GRID_KEYS}))
    return out


def _check_block(where: str, block: dict) -> list[Size]:
    """Validates one block's values (one-line ConfigErrors prefixed by `where`); its sizes."""
    for key in GRID_KEYS:
        if isinstance(block[key], str):
            raise ConfigError(f"{where}{key}: {block[key]!r} is a string, not a tuple (write ({block[key]!r},))")
        if not tuple(block[key]):
            raise ConfigError(f"{where}{key}: the grid needs at least one value")
    for key in ("steps", "seeds"):
        values = tuple(block[key])
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v]
        if bad:
            raise ConfigError(f"{where}{key}: {bad[0]!r} is not an integer")
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}{key}: {values} repeats a value (run ids would collide)")
    for steps in block["steps"]:
        if int(steps) <= 0:
            raise ConfigError(f"{where}steps: {steps} is not a positive step count")
    sizes = [parse_size(s) for s in block["sizes"]]
    if len({s.label for s in sizes}) != len(sizes):
        raise ConfigError(f"{where}sizes: two sizes share a label")
    return sizes


def plan(sweep) -> list[Run]:
    """Every run of the grid (trunks first), validated; raises ConfigError with one line. The
    runs of a (size, budget, seed) come together, in the order the blocks first name them."""
    if sweep.branch not in BRANCH_MODES:
        raise ConfigError(f"branch: {sweep.branch!r} is not one of {', '.join(BRANCH_MODES)}")
    if any(not 0 < float(f) < 1 for f in sweep.get("keep_fractions", ())):
        raise ConfigError(f"keep_fractions: {tuple(sweep.keep_fractions)} must lie strictly between 0 and 1")
    sizes: dict[str, Size] = {}  # label -> size, over every block
    budgets: dict[tuple[str, int, int], list[str]] = {}  # (size label, steps, seed) -> schedule names
    steps_seen: dict[int, None] = {}
    seeds_seen: dict[int, None] = {}
    for where, block in grid_blocks(sweep):
        for size in _check_block(where, block):
            if sizes.setdefault(size.label, size) != size:
                raise ConfigError(f"{where}sizes: {size.label!r} names another size in an earlier block")
            for steps in block["steps"]:
                steps_seen.setdefault(int(steps))
                for seed in block["seeds"]:
                    seeds_seen.setdefault(int(seed))
                    names = budgets.setdefault((size.label, int(steps), int(seed)), [])
                    names += [s for s in dict.fromkeys(block["schedules"]) if s not in names]
    common = parse_overrides(sweep.overrides)
    mask_ratios = {}
    for size in sizes.values():
        overrides = {k: parse_value(v) for k, v in list(common) + list(size.overrides)}
        try:  # unknown presets and keys fail here, once per size
            mask_ratios[size.label] = float(load_config(f"{sweep.base}:{size.preset}", overrides).mlm.mask_ratio)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"sizes: {size.label}: {e}") from e
    order = [list(sizes), list(steps_seen), list(seeds_seen)]
    runs: list[Run] = []
    for label, steps, seed in sorted(budgets, key=lambda k: tuple(o.index(x) for o, x in zip(order, k))):
        runs += _budget_runs(sweep, sizes[label], steps, seed, mask_ratios[label], budgets[label, steps, seed])
    return runs


def _budget_runs(sweep, size: Size, steps: int, seed: int, mask_ratio: float, schedules: list[str]) -> list[Run]:
    runs = []
    keep = tuple(sorted({int(round(f * steps)) for f in sweep.get("keep_fractions", ())} - {0, steps}))
    for schedule in schedules:
        clm_steps, ratio = _clm_prefix(schedule, steps, mask_ratio)
        runs.append(Run(run_id(size.label, steps, schedule, seed), size, steps, schedule, seed, clm_steps, ratio,
                        keep_steps=keep))
    branches = [r for r in runs if 0 < r.clm_steps < steps]
    if sweep.branch != "resume" or not branches:
        return runs
    trunk = next((r for r in runs if r.clm_steps == steps), None)
    if trunk is None:
        if sum(r.clm_steps for r in branches) <= steps:  # an added trunk would cost more than it saves
            return runs
        trunk = Run(run_id(size.label, steps, "clm", seed), size, steps, "clm", seed, steps, 0.0, keep_steps=keep,
                    in_grid=False)
        runs.insert(0, trunk)
    trunk.keep_steps = tuple(sorted(set(trunk.keep_steps) | {r.clm_steps for r in branches}))
    for r in branches:
        r.branch_from, r.branch_step = trunk.id, r.clm_steps
    return [trunk] + [r for r in runs if r is not trunk]
