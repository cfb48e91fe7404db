"""Objective schedules (step -> objective) and learning-rate schedules (optax).

Objective schedule strings:
  `clm`, `mlm` (ratio from `mlm.mask_ratio`), `mlm40` (40 % masking), ...
  `clm50_mlm40`           CLM for the first 50 % of the steps, then MLM-40 %.
  `clm10k_mlm40`          CLM for the first 10,000 steps (N k = N thousand steps, whatever
                          the budget), then MLM-40 %: the study's names (`clm-10k-mlm40-42k`).
  `clm+mlm30@1000+mlm40@75%`  the general piecewise form: phases joined by `+`, each but the
                          first starting at an absolute step or a percentage of the steps.
"""

from __future__ import annotations

import dataclasses
import re

import optax


@dataclasses.dataclass(frozen=True, order=True)
class Objective:
    """What one step trains: `kind` is 'clm' or 'mlm'; `mask_ratio` is 0 for CLM."""

    kind: str
    mask_ratio: float = 0.0

    @property
    def mask_mode(self) -> str:
        return "causal" if self.kind == "clm" else "bidirectional"

    @property
    def name(self) -> str:
        return "clm" if self.kind == "clm" else f"mlm{round(self.mask_ratio * 100)}"


@dataclasses.dataclass(frozen=True)
class Phase:
    objective_name: str  # 'clm', 'mlm', 'mlmYY'
    start: int | str  # absolute step (int) or 'NN%'


_NAME = re.compile(r"^(clm|mlm)(\d{1,2})?$")


LR_SCHEDULES = ("wsd", "cosine", "constant")  # optimizer.schedule

def _objective(name: str, default_ratio: float) -> Objective:
    m = _NAME.match(name)
    if not m or (m.group(1) == "clm" and m.group(2)):
        raise ValueError(f"objective: unknown objective {name!r} (use clm, mlm or mlmYY)")
    if m.group(1) == "clm":
        return Objective("clm")
    ratio = int(m.group(2)) / 100 if m.group(2) else default_ratio
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"objective: mask ratio of {name!r} must be in (0, 1), got {ratio}")
    return Objective("mlm", ratio)


def parse_objective(spec: str) -> list[Phase]:
    """Parse an objective schedule string into phases (validated, not yet resolved to steps)."""
    spec = spec.strip()
    if not spec:
        raise ValueError("objective: empty objective schedule")
    if "+" in spec or "@" in spec:
        phases = []
        for i, part in enumerate(spec.split("+")):
            name, _, start = part.partition("@")
            if i == 0:
                if start not in ("", "0", "0%"):
                    raise ValueError(f"objective: the first phase of {spec!r} must start at 0")
                start = 0
            elif not re.fullmatch(r"\d+%?", start):
                raise ValueError(f"objective: phase {part!r} of {spec!r} needs @STEP or @NN%")
            elif not start.endswith("%"):
                start = int(start)
            _objective(name, 0.4)
            phases.append(Phase(name, start))
        return phases
    parts = spec.split("_")
    phases, start, unit = [], 0, ""  # unit: '%' (clmXX) or 'k' (clmNk) once a CLM phase set it
    for i, part in enumerate(parts):
        if part.startswith("clm") and i < len(parts) - 1:
            m = re.fullmatch(r"clm(?:(\d{1,3})|(\d{1,4})k)", part)
            if not m:
                raise ValueError(f"objective: {spec!r}: a CLM phase before another needs its length: clmXX "
                                 f"(XX % of the steps) or clmNk (N thousand steps), got {part!r}")
            this = "%" if m.group(1) else "k"
            if unit and this != unit:
                raise ValueError(f"objective: {spec!r} mixes percentages (clmXX) and step counts (clmNk)")
            unit, length = this, int(m.group(1) or m.group(2))
            if length == 0:
                raise ValueError(f"objective: {spec!r}: the CLM phase {part!r} is empty")
            phases.append(Phase("clm", _start(start, unit)))
            start += length if unit == "%" else 1000 * length
            if unit == "%" and start >= 100:
                raise ValueError(f"objective: {spec!r}: the CLM phase must be shorter than 100 %")
        elif re.fullmatch(r"(clm|mlm)(\d{1,3})?", part):
            _objective(part, 0.4)
            phases.append(Phase(part, _start(start, unit or "%")))
        else:
            raise ValueError(f"objective: unknown objective preset {spec!r}")
    return phases


def _start(value: int, unit: str) -> int | str:
    """A preset phase's start: a percentage ('NN%') or an absolute step."""
    return f"{value}%" if unit == "%" else value


@dataclasses.dataclass(frozen=True)
class ObjectiveSchedule:
    """A pure step -> Objective map with exact switch steps."""

    starts: tuple[int, ...]
    objectives: tuple[Objective, ...]

    def __call__(self, step: int) -> Objective:
        current = self.objectives[0]
        for start, obj in zip(self.starts, self.objectives):
            if step >= start:
                current = obj
        return current

    @property
    def switch_steps(self) -> tuple[int, ...]:
        return self.starts[1:]

    def distinct(self) -> tuple[Objective, ...]:
        return tuple(dict.fromkeys(self.objectives))


def _resolve(start, total_steps: int) -> int:
    if isinstance(start, str):
        return total_steps * int(start[:-1]) // 100
    return int(start)


def objective_schedule(spec: str, total_steps: int, default_mask_ratio: float = 0.4) -> ObjectiveSchedule:
    phases = parse_objective(spec)
    starts = tuple(_resolve(p.start, total_steps) for p in phases)
    objectives = tuple(_objective(p.objective_name, default_mask_ratio) for p in phases)
    for a, b in zip(starts, starts[1:]):
        if b <= a:
            raise ValueError(f"objective: phases of {spec!r} must start at increasing steps, got {starts}")
    if starts[-1] >= total_steps and len(starts) > 1:
        raise ValueError(
            f"objective: switch step {starts[-1]} of {spec!r} is not before the end (train.steps={total_steps})"
        )
    return ObjectiveSchedule(starts, objectives)


def learning_rate_schedule(opt_cfg, total_steps: int, switch_steps: tuple[int, ...] = ()) -> optax.Schedule:
    """Warmup-stable-decay (default), cosine or constant; optional re-warmup at each switch."""
    peak = opt_cfg.learning_rate
    floor = peak * opt_cfg.min_lr_ratio
    warmup = max(1, int(round(opt_cfg.warmup_fraction * total_steps))) if opt_cfg.warmup_fraction > 0 else 0
    if opt_cfg.schedule == "wsd":
        decay = int(round(opt_cfg.decay_fraction * total_steps))
        stable = max(0, total_steps - warmup - decay)
        pieces = [
            optax.linear_schedule(0.0, peak, warmup) if warmup else None,
            optax.constant_schedule(peak),
            optax.linear_schedule(peak, floor, max(decay, 1)),
        ]
        bounds = [warmup, warmup + stable]
        if not warmup:
            pieces, bounds = pieces[1:], bounds[1:]
        base = optax.join_schedules(pieces, bounds)
    elif opt_cfg.schedule == "cosine":
        base = optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(total_steps, warmup + 1), floor)
    elif opt_cfg.schedule == "constant":
        base = optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup]
        )
    else:
        raise ValueError(f"optimizer.schedule: unknown schedule {opt_cfg.schedule!r} ({', '.join(LR_SCHEDULES)})")
    if not (opt_cfg.rewarmup_at_switch and switch_steps):
        return base
    rewarm = max(1, int(round(opt_cfg.rewarmup_fraction * total_steps)))

    def schedule(step):
        factor = 1.0
        for s in switch_steps:
            ramp = (step - s + 1) / rewarm
            inside = (step >= s) & (step < s + rewarm)
            factor = factor * (1.0 - inside) + factor * inside * ramp
        return base(step) * factor

    return schedule
