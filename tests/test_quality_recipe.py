"""The MCNC-LoRA recipe: the shipped defaults equal docs/quality.md, ``choose_d`` picks the
smallest chunk size that fits, and ``benchmarks/bench_quality.py --quick`` runs.

Sizes and budgets are fresh random draws each run, seeded from ``MCNC_TEST_SEED`` or a random
seed printed on failure (torch_helpers.SEED). Nothing here asserts a quality figure.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch_helpers import SEED, one_thread  # noqa: F401 (one_thread: autouse fixture)

from mcnc_format.errors import ReparametrizeError
from mcnc_format.torch import (
    LORA_RECIPE,
    Manifest,
    MCNCConfig,
    add_mcnc_lora,
    choose_d,
    lora_factor_sizes,
    mcnc_lora_config,
    payload_values,
)

REPO = Path(__file__).resolve().parents[1]
RECIPE_MARK = "<!-- recipe:"


def _documented_recipe() -> dict[str, str]:
    """The ``| setting | value |`` rows after the recipe marker in docs/quality.md."""
    lines = (REPO / "docs" / "quality.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(RECIPE_MARK))
    rows: dict[str, str] = {}
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        if cells[0] in ("setting", "") or set(cells[0]) <= {"-"}:
            continue
        rows[cells[0]] = cells[1]
    return rows


def test_the_shipped_recipe_is_the_documented_one() -> None:
    documented = _documented_recipe()
    shipped = {
        "k": str(LORA_RECIPE.k),
        "hidden": ", ".join(map(str, LORA_RECIPE.hidden)),
        "L": f"{LORA_RECIPE.L:g}",
        "beta_init": f"{LORA_RECIPE.beta_init:g}",
        "learning_rate": f"{LORA_RECIPE.learning_rate:g}",
        "rank": str(LORA_RECIPE.rank),
        "ratio": f"{LORA_RECIPE.ratio:g}",
    }
    assert documented == shipped


class _TwoLayers(nn.Module):
    def __init__(self, widths: tuple[int, int, int]) -> None:
        super().__init__()
        self.up = nn.Linear(widths[0], widths[1])
        self.down = nn.Linear(widths[1], widths[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _stored_numbers(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters()
               if n.startswith(("mcnc_alpha_", "mcnc_beta_")))


@pytest.mark.parametrize("size", ["large", "small"])
def test_add_mcnc_lora_without_a_config_uses_the_recipe(size: str) -> None:
    """Layers large enough get the recipe's ratio; layers too small for it get one chunk per
    factor (the fewest numbers) instead of an error."""
    rng = random.Random(f"{SEED}-{size}")
    if size == "large":
        widths = (rng.randint(64, 160), rng.randint(64, 160), rng.randint(32, 96))
    else:
        widths = (rng.randint(2, 12), rng.randint(2, 12), rng.randint(2, 12))
    model = add_mcnc_lora(_TwoLayers(widths), target_modules=["up", "down"])
    config = Manifest.from_tensor(model.mcnc_config, "test").config
    assert (config.k, config.hidden, config.L, config.beta_init) == (
        LORA_RECIPE.k, LORA_RECIPE.hidden, LORA_RECIPE.L, LORA_RECIPE.beta_init)
    assert model.up.lora_A.out_features == LORA_RECIPE.rank
    sizes = lora_factor_sizes(_TwoLayers(widths), ["up", "down"], LORA_RECIPE.rank)
    if size == "large":
        assert _stored_numbers(model) <= sum(sizes) / LORA_RECIPE.ratio
        assert config.d == choose_d(sizes, LORA_RECIPE.k, ratio=LORA_RECIPE.ratio)
    else:
        assert config.d == max(sizes)
        assert _stored_numbers(model) == len(sizes) * (LORA_RECIPE.k + 1)


@pytest.mark.parametrize("target", ["budget", "ratio"])
def test_choose_d_is_the_smallest_chunk_size_that_fits(target: str) -> None:
    rng = random.Random(f"{SEED}-{target}")
    for _ in range(50):
        sizes = [rng.randint(1, 5000) for _ in range(rng.randint(1, 12))]
        k, m = rng.randint(1, 20), rng.randint(1, 3)
        floor = payload_values(sizes, k, max(sizes), m)  # one chunk per segment
        limit = rng.randint(floor, payload_values(sizes, k, 1, m))
        if target == "budget":
            dtype = rng.choice(["f32", "f16", "bf16"])
            size = 4 if dtype == "f32" else 2
            d = choose_d(sizes, k, budget_bytes=limit * size, m=m, dtype=dtype)
        else:
            ratio = sum(sizes) / limit
            limit = math.floor(sum(sizes) / ratio)
            d = choose_d(sizes, k, ratio=ratio, m=m)
        assert payload_values(sizes, k, d, m) <= limit
        assert d == 1 or payload_values(sizes, k, d - 1, m) > limit


def test_choose_d_refuses_what_cannot_fit() -> None:
    with pytest.raises(ReparametrizeError, match="chunking='model'"):
        choose_d([1000, 1000, 1000], 8, budget_bytes=3 * 9 * 4 - 1)
    assert choose_d([1000, 1000, 1000], 8, budget_bytes=3 * 9 * 4) == 1000
    for bad in ({}, {"budget_bytes": 100, "ratio": 2.0}, {"budget_bytes": 0},
                {"ratio": float("nan")}, {"budget_bytes": 100, "dtype": "i8"}):
        with pytest.raises(ReparametrizeError):
            choose_d([100], 4, **bad)
    # k or m that no MCNCConfig accepts gave a chunk size for a config that cannot exist
    for k, m in ((0, 1), (-3, 1), (2.5, 1), (4, 0), (4, True)):
        with pytest.raises(ReparametrizeError, match=r"choose_d: [km] must be an integer"):
            choose_d([100], k, m=m, ratio=2.0)


@pytest.mark.parametrize("chunking", ["tensor", "model"])
def test_a_config_for_a_budget_trains_within_it(chunking: str) -> None:
    rng = random.Random(f"{SEED}-{chunking}")
    widths = (rng.randint(16, 96), rng.randint(16, 96), rng.randint(4, 48))
    rank = rng.randint(1, 16)
    sizes = lora_factor_sizes(_TwoLayers(widths), ["up", "down"], rank)
    floor = payload_values(sizes if chunking == "tensor" else [sum(sizes)], LORA_RECIPE.k,
                           max(sizes) if chunking == "tensor" else sum(sizes))
    budget = 4 * rng.randint(floor, 4 * floor)
    config = mcnc_lora_config(_TwoLayers(widths), ["up", "down"], rank=rank,
                              budget_bytes=budget, chunking=chunking, seed=SEED & 0xFFFF)
    assert isinstance(config, MCNCConfig) and config.chunking == chunking
    model = add_mcnc_lora(_TwoLayers(widths), config, target_modules=["up", "down"], rank=rank)
    assert 4 * _stored_numbers(model) <= budget
    assert _stored_numbers(model) == payload_values(
        sizes if chunking == "tensor" else [sum(sizes)], config.k, config.d)


def test_the_quality_benchmark_quick_run(tmp_path: Path) -> None:
    """``benchmarks/bench_quality.py --quick``: every method trains, sweeps and is sized; the
    JSON holds a chosen rate strictly inside its grid or says it is not."""
    pytest.importorskip("peft")  # the LoRA and VeRA it compares with
    out = tmp_path / "quality.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_quality.py"),
                          "--quick", "--results", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(out.read_text())
    assert set(data["tasks"]) == {"lm", "digits"}
    families = {r["family"] for r in data["runs"].values()}
    assert families == {"mcnc", "lora", "vera", "full"}
    assert all(r["stored_bytes"] > 0 and math.isfinite(r["train_seconds"])
               for r in data["runs"].values())
    for task in data["tasks"].values():
        for sweep in task["sweeps"].values():
            grid, chosen = sweep["grid"], sweep["chosen"]
            assert sweep["inside"] == (grid[0] < chosen < grid[-1])


def test_the_quality_figures_go_into_a_new_folder(tmp_path: Path) -> None:
    """``bench_quality.py --plot --figures DIR`` makes DIR: a folder that did not exist was a
    FileNotFoundError from savefig after the tables were printed."""
    pytest.importorskip("matplotlib")  # the bench extra
    pytest.importorskip("peft")
    out = tmp_path / "quality.json"
    script = str(REPO / "benchmarks" / "bench_quality.py")
    run = subprocess.run([sys.executable, script, "--quick", "--task", "lm", "--results",
                          str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    figures = tmp_path / "figures" / "new"
    run = subprocess.run([sys.executable, script, "--plot", "--results", str(out), "--figures",
                          str(figures)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in figures.iterdir()) == [
        "quality_loss_vs_bytes.png", "quality_loss_vs_payload.png", "quality_loss_vs_time.png"]
