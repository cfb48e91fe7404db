"""Sweep grids without training: the study's grid (configs/sweeps/paper.py), the full cross
(paper_cross.py), grids as unions of blocks, and switch steps named in thousands (clm10k_mlm40)."""

import pytest
from helpers import run_command

from mlm_vs_clm import schedules
from mlm_vs_clm.config import ConfigError, load_config
from mlm_vs_clm.sweep import plan as sweep_plan

SIZES = ("210m", "610m", "1b")
BUDGETS = (12000, 22000, 42000)
# The study's round switch steps (10k and 21k of 42k are its names; the rest are ours: paper.py).
SWITCHES = {12000: (3000, 6000, 9000), 22000: (5000, 11000, 17000), 42000: (10000, 21000, 32000)}
D32 = "d32=tiny:model.hidden_size=32,model.ffn_size=96"


def _micro(**kw):
    c = load_config("configs/sweeps/micro.py")
    c.sizes, c.steps, c.schedules = ("d64=tiny",), (20,), ("mlm40", "clm", "clm50_mlm40")
    for k, v in kw.items():
        c[k] = v
    return c


def _ids(runs):
    return [r.id for r in runs]


# ------------------------------------------------------------------ the study's grid


def test_paper_grid_is_the_36_runs_documented_in_its_config():
    runs = sweep_plan.plan(load_config("configs/sweeps/paper.py"))
    ids = _ids(runs)
    assert len(ids) == len(set(ids)) == 36 and all(r.in_grid for r in runs)
    objective_vs_scale = {f"{s}_{b}_{x}_s0" for s in SIZES for b in BUDGETS for x in ("mlm40", "clm")}
    mask_ratios = {f"{s}_42000_mlm{m}_s0" for s in SIZES for m in (20, 30, 40, 50)}
    biphasic = {f"610m_{b}_clm{k // 1000}k_mlm40_s0" for b in BUDGETS for k in SWITCHES[b]}
    assert (len(objective_vs_scale), len(mask_ratios - objective_vs_scale), len(biphasic)) == (18, 9, 9)
    assert set(ids) == objective_vs_scale | mask_ratios | biphasic


def test_paper_biphasic_runs_are_mlm40_branches_of_their_trunk_at_the_round_switch():
    runs = sweep_plan.plan(load_config("configs/sweeps/paper.py"))
    by_id = {r.id: r for r in runs}
    branches = [r for r in runs if 0 < r.clm_steps < r.steps]
    assert len(branches) == 9
    for r in branches:
        trunk = by_id[f"{r.size.label}_{r.steps}_clm_s0"]
        assert (r.size.label, r.mask_ratio, r.branch_from, r.branch_step) == ("610m", 0.4, trunk.id, r.clm_steps)
        assert r.clm_steps in SWITCHES[r.steps] and r.clm_steps % 1000 == 0
        assert runs.index(trunk) < runs.index(r)
    for b in BUDGETS:
        assert by_id[f"610m_{b}_clm_s0"].keep_steps == SWITCHES[b]
    # The study's own names: 610m-clm-10k-mlm40-42k and 610m-clm-21k-mlm40-42k switch at 10,000 and 21,000.
    assert by_id["610m_42000_clm10k_mlm40_s0"].branch_step == 10000
    assert by_id["610m_42000_clm21k_mlm40_s0"].branch_step == 21000
    assert not any(r.branch_from for r in runs if r.size.label != "610m")


def test_paper_cross_keeps_the_153_run_cross():
    runs = sweep_plan.plan(load_config("configs/sweeps/paper_cross.py"))
    assert len(runs) == 3 * 3 * 17
    branches = [r for r in runs if r.branch_from]
    assert len(branches) == 3 * 3 * 12
    by_id = {r.id: r for r in runs}
    r = by_id["610m_42000_clm25_mlm30_s0"]
    assert (r.branch_from, r.branch_step, r.mask_ratio, r.clm_fraction) == ("610m_42000_clm_s0", 10500, 0.3, 0.25)
    trunk = by_id["610m_42000_clm_s0"]
    assert trunk.keep_steps == (10500, 21000, 31500)
    assert runs.index(trunk) < runs.index(r)  # trunks come first
    assert by_id["1b_12000_mlm50_s0"].branch_from == ""


def test_print_backend_plans_the_paper_grid_without_training(tmp_path):
    proc = run_command("sweep", ["--config=configs/sweeps/paper.py", f"--workdir={tmp_path}", "--backend=print"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("sweep: 36 runs (9 branch from a CLM trunk, saving ")
    assert sum("run-one" in ln for ln in lines) == 36
    assert "# stage 2: 9 runs (each after its trunk in stage 1)" in lines
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ------------------------------------------------------------------ blocks


def test_blocks_are_a_deduplicated_union():
    c = _micro(blocks=(
        dict(sizes=("d64=tiny",), steps=(20,), schedules=("mlm40", "clm")),
        dict(sizes=("d64=tiny", D32), steps=(20, 40), schedules=("clm", "clm50_mlm40")),
        dict(sizes=("d64=tiny",), steps=(20,), schedules=("mlm40",)),  # already planned
    ))
    runs = sweep_plan.plan(c)
    assert _ids(runs) == ["d64_20_clm_s0", "d64_20_mlm40_s0", "d64_20_clm50_mlm40_s0",
                          "d64_40_clm_s0", "d64_40_clm50_mlm40_s0",
                          "d32_20_clm_s0", "d32_20_clm50_mlm40_s0",
                          "d32_40_clm_s0", "d32_40_clm50_mlm40_s0"]
    assert [r.branch_from for r in runs if "clm50" in r.id] == ["d64_20_clm_s0", "d64_40_clm_s0",
                                                                 "d32_20_clm_s0", "d32_40_clm_s0"]


def test_one_block_or_a_repeated_block_plans_what_the_top_level_keys_plan():
    c = _micro(seeds=(0, 1))
    plain = _ids(sweep_plan.plan(c))
    block = dict(sizes=c.sizes, steps=c.steps, schedules=c.schedules)  # seeds from the top level
    assert _ids(sweep_plan.plan(_micro(seeds=(0, 1), blocks=(block,)))) == plain
    assert _ids(sweep_plan.plan(_micro(seeds=(0, 1), blocks=(block, block)))) == plain
    assert len(plain) == 6


@pytest.mark.parametrize("blocks,message", [
    ((dict(size=("d64=tiny",)),), "blocks[0]: unknown key 'size' (a block has sizes, steps, schedules, seeds)"),
    (("d64=tiny",), "blocks[0]: expected dict(sizes=..., steps=..., schedules=..., seeds=...), got 'd64=tiny'"),
    ((dict(), dict(sizes=("d64=tiny:model.hidden_size=32",))), "blocks[1]: sizes: 'd64' names another size"),
    ((dict(), dict(steps=(20, 20))), "blocks[1]: steps: (20, 20) repeats a value"),
    ((dict(schedules="clm"),), "blocks[0]: schedules: 'clm' is a string, not a tuple"),
    ((dict(schedules=()),), "blocks[0]: schedules: the grid needs at least one value"),
])
def test_bad_blocks_are_one_line_errors(blocks, message):
    with pytest.raises(ConfigError) as e:
        sweep_plan.plan(_micro(blocks=blocks))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# ------------------------------------------------------------------ switch steps in thousands


def test_switch_steps_in_thousands_do_not_depend_on_the_budget():
    for steps in (12000, 42000):
        s = schedules.objective_schedule("clm10k_mlm40", steps)
        assert s.switch_steps == (10000,) and [s(i).name for i in (9999, 10000)] == ["clm", "mlm40"]
    assert schedules.objective_schedule("clm3k_mlm30", 12000).objectives[1] == schedules.Objective("mlm", 0.3)
    assert load_config("configs/pretrain.py:610m,clm10k_mlm40").objective == "clm10k_mlm40"


@pytest.mark.parametrize("spec,steps,message", [
    ("clm42k_mlm40", 42000, "objective: switch step 42000 of 'clm42k_mlm40' is not before the end (train.steps=42000)"),
    ("clm50k_mlm40", 42000, "objective: switch step 50000 of 'clm50k_mlm40' is not before the end"),
    ("clm0k_mlm40", 42000, "objective: 'clm0k_mlm40': the CLM phase 'clm0k' is empty"),
    ("clm0_mlm40", 100, "objective: 'clm0_mlm40': the CLM phase 'clm0' is empty"),
    ("clm10x_mlm40", 42000, "objective: 'clm10x_mlm40': a CLM phase before another needs its length: clmXX "
                            "(XX % of the steps) or clmNk (N thousand steps), got 'clm10x'"),
    ("clm1.5k_mlm40", 42000, "objective: 'clm1.5k_mlm40': a CLM phase before another needs its length"),
    ("clmk_mlm40", 42000, "objective: 'clmk_mlm40': a CLM phase before another needs its length"),
    ("clm10k_clm25_mlm40", 42000, "objective: 'clm10k_clm25_mlm40' mixes percentages (clmXX) and step counts"),
    ("mlm40_clm10k", 42000, "objective: unknown objective preset 'mlm40_clm10k'"),
])
def test_bad_switch_names_are_one_line_errors(spec, steps, message):
    with pytest.raises(ValueError) as e:
        schedules.objective_schedule(spec, steps)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_switch_past_a_budget_stops_the_sweep_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^schedules: objective: switch step 20000 of 'clm20k_mlm40' is not "
                                          r"before the end \(train.steps=20\)$"):
        sweep_plan.plan(_micro(schedules=("clm", "clm20k_mlm40")))
    proc = run_command("sweep", ["--config=configs/sweeps/micro.py", "--config.schedules=('clm','clm0k_mlm40')",
                                 f"--workdir={tmp_path / 'w'}", "--backend=print"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["sweep: schedules: objective: 'clm0k_mlm40': the CLM phase 'clm0k' "
                                                "is empty"]
