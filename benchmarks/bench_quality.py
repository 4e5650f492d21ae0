"""Quality per stored byte: MCNC-LoRA against PEFT's LoRA and VeRA, and full fine-tuning.

Two fine-tuning tasks, each from a pretrained base, trained on the same batches for the same
steps by every method:

- ``lm``: the task of ``examples/finetune_lm.py`` at a smaller scale: a byte-level transformer
  pretrained on Python code (``argparse``'s source), fine-tuned on English
  (``pydoc_data.topics``); validation loss in nats/byte on held-out English.
- ``digits``: an MLP classifier pretrained on the handwritten digits that ship with the package
  (``mcnc_format.examples.digits``), fine-tuned on the same digits rotated by 90 degrees;
  validation cross-entropy (and accuracy) on held-out rotated digits.

Methods, at stored-byte budgets around 4 KB, 16 KB, 64 KB and 256 KB:

- **MCNC-LoRA** (``mcnc_format.torch.add_mcnc_lora``) with several rank / k / d / generator
  settings; stored bytes = the ``.mcnc`` file ``mcnc pack --base`` writes (header included,
  theta0 a sha256-pinned reference to the base checkpoint).
- **LoRA** (PEFT ``LoraConfig``), small ranks and, for the smallest budgets, fewer layers;
  stored bytes = the ``adapter_model.safetensors`` that ``save_pretrained`` writes (float32).
- **VeRA** (PEFT ``VeraConfig``, ``save_projection=False``: the projections are regenerated
  from ``projection_prng_key``); stored bytes = its ``adapter_model.safetensors``.
- **Full fine-tuning**, the ceiling; stored bytes = the whole model as safetensors.

Each configuration's learning rate comes from a sweep on seed 0 over a geometric grid, which
grows at an edge until the best rate is strictly inside it; the other seeds then run at that
rate. Every run is stored in one JSON file as soon as it ends, so the sweep resumes where it
stopped. ``--plot`` turns the JSON into the figures of docs/quality.md.

    python benchmarks/bench_quality.py                 # the full sweep (resumes)
    python benchmarks/bench_quality.py --plan          # every configuration's stored bytes
    python benchmarks/bench_quality.py --plot          # figures + tables from the JSON
    python benchmarks/bench_quality.py --quick         # a smoke run (tests), no matplotlib
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import finetune_lm as lm  # noqa: E402  (the example's model, data and batches)
from bench_load import machine_info  # noqa: E402

from mcnc_format.converters.pack import pack  # noqa: E402
from mcnc_format.examples.digits import split_digits  # noqa: E402
from mcnc_format.torch import MCNCConfig, add_mcnc_lora  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "quality.json"
BUDGETS = (4096, 16384, 65536, 262144)
GRID_RATIO = 2.0
MAX_GRID = 9  # a sweep that never turns inside 9 points is reported as not converged


# -- tasks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    batch: int
    pretrain_steps: int
    steps: int
    evals: int  # validation points along the run (the loss-against-time curve)
    pretrain_lr: float = 3e-3


class Task:
    """A pretrained base, fine-tuning batches and a validation loss."""

    name: str
    targets: tuple[str, ...]  # module-name suffixes adapters attach to
    schedule: Schedule
    ablation_seeds = 3  # seeds of the MCNC ablations (the comparison gets --seeds)

    def make_model(self) -> nn.Module:
        raise NotImplementedError

    def pretrain_batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pretrain_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(model, x, y)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def base(self) -> nn.Module:
        """The pretrained base (seed 0, one thread: the same weights on every run)."""
        if not hasattr(self, "_base"):
            torch.manual_seed(0)
            model = self.make_model()
            optimizer = torch.optim.Adam(model.parameters(), lr=self.schedule.pretrain_lr)
            for x, y in self.pretrain_batches(0):
                optimizer.zero_grad(set_to_none=True)
                self.pretrain_loss(model, x, y).backward()
                optimizer.step()
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._base = model
        return copy.deepcopy(self._base)


class LanguageTask(Task):
    """``examples/finetune_lm.py``'s task: code-pretrained byte LM, fine-tuned on English."""

    name = "lm"
    targets = lm.TARGETS
    ablation_seeds = 1  # each run costs about a minute on the shared 2-core machine

    def __init__(self, size: lm.Size, schedule: Schedule) -> None:
        self.size, self.schedule = size, schedule
        code, english = lm.texts()
        self.code = lm.as_tokens(code)
        english_tokens = lm.as_tokens(english)
        split = int(len(english_tokens) * 0.9)
        self.train_tokens, self.held_out = english_tokens[:split], english_tokens[split:]

    def make_model(self) -> nn.Module:
        return lm.TinyLM(self.size)

    def pretrain_batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return lm.batches(self.code, self.size, self.schedule.pretrain_steps, seed)

    def batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return lm.batches(self.train_tokens, self.size, self.schedule.steps, 1000 + seed)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).reshape(-1, lm.VOCAB), y.reshape(-1))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"loss": lm.validation_loss(model, self.held_out, self.size)}

    def describe(self) -> dict[str, Any]:
        return {"model": asdict(self.size), "schedule": asdict(self.schedule),
                "parameters": sum(p.numel() for p in self.make_model().parameters()),
                "pretrain": "argparse source, bytes", "finetune": "pydoc_data.topics, 90%",
                "validation": f"last 10% of pydoc_data.topics, {self.size.eval_windows} "
                              f"windows of {self.size.context} bytes"}


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class DigitsTask(Task):
    """An MLP pretrained on upright 8x8 digits, fine-tuned on the digits rotated by 90 degrees
    (the same pixels, moved: the base's features apply, its first layer no longer fits)."""

    name = "digits"
    targets = ("fc1", "fc2", "fc3")

    def __init__(self, hidden: int, schedule: Schedule) -> None:
        self.hidden, self.schedule = hidden, schedule
        split = split_digits(0.2, seed=0)
        self.x_train, self.y_train = split.x_train, split.y_train
        self.rot_train, self.rot_test = _rotated(split.x_train), _rotated(split.x_test)
        self.y_test = split.y_test

    def make_model(self) -> nn.Module:
        return DigitsMLP(self.hidden)

    def _draw(self, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            pick = torch.randint(0, len(x), (self.schedule.batch,), generator=g)
            yield x[pick], y[pick]

    def pretrain_batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._draw(self.x_train, self.y_train, self.schedule.pretrain_steps, seed)

    def batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._draw(self.rot_train, self.y_train, self.schedule.steps, 1000 + seed)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def pretrain_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # label smoothing keeps the base's logits moderate: without it the base is so sure of
        # itself on rotated digits (cross-entropy above 20) that every method's gain looks alike
        return F.cross_entropy(model(x), y, label_smoothing=0.1)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            logits = model(self.rot_test)
        return {"loss": float(F.cross_entropy(logits, self.y_test)),
                "accuracy": float((logits.argmax(1) == self.y_test).float().mean())}

    def describe(self) -> dict[str, Any]:
        return {"model": f"MLP 64-{self.hidden}-{self.hidden}-10, GELU",
                "schedule": asdict(self.schedule),
                "parameters": sum(p.numel() for p in self.make_model().parameters()),
                "pretrain": "digits (80% split), upright",
                "finetune": "the same 80%, rotated 90 degrees",
                "validation": "the other 20%, rotated 90 degrees (360 images)"}


def _rotated(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x.view(-1, 8, 8), 1, (1, 2)).reshape(-1, 64).contiguous()


def make_tasks(quick: bool) -> dict[str, Task]:
    if quick:
        return {"lm": _language(16, 1, 2, 16, 8, Schedule(batch=4, pretrain_steps=10, steps=6,
                                                          evals=2)),
                "digits": DigitsTask(32, Schedule(batch=32, pretrain_steps=20, steps=6, evals=2))}
    return {"lm": _language(64, 2, 4, 32, 64, Schedule(batch=16, pretrain_steps=400, steps=100,
                                                       evals=4)),
            "digits": DigitsTask(256, Schedule(batch=64, pretrain_steps=300, steps=150,
                                               evals=5))}


def _language(dim: int, layers: int, heads: int, context: int, eval_windows: int,
              schedule: Schedule) -> LanguageTask:
    """The example's model at this size (its own schedule fields unused: ours is ``schedule``)."""
    size = lm.Size(dim=dim, layers=layers, heads=heads, context=context, batch=schedule.batch,
                   pretrain_steps=0, finetune_steps=0, rank=0, k=0, d=0,
                   eval_windows=eval_windows)
    return LanguageTask(size, schedule)


# -- methods -------------------------------------------------------------------------------
class Method:
    """One adapter configuration: how to build it on a base and what a user ships."""

    family: str
    lr_start: tuple[float, ...]

    @property
    def label(self) -> str:
        raise NotImplementedError

    def build(self, base: nn.Module, task: Task, seed: int) -> nn.Module:
        raise NotImplementedError

    def stored_bytes(self, model: nn.Module, task: Task, work: Path) -> int:
        raise NotImplementedError

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """Adam's parameter groups: every trainable parameter at ``lr``."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "lr_start"}  # type: ignore[call-overload]


@dataclass(frozen=True)
class McncLora(Method):
    rank: int
    k: int
    d: int
    hidden: tuple[int, ...] = (32, 32)
    L: float = 20.0
    chunking: str = "tensor"
    beta_init: float = 0.0
    targets: tuple[str, ...] | None = None
    alpha_lr_scale: float = 1.0  # alpha's learning rate = lr * alpha_lr_scale
    lr_start: tuple[float, ...] = (0.1, 0.2, 0.4)
    family: str = "mcnc"

    @property
    def label(self) -> str:
        extra = "" if self.hidden == (32, 32) else f" h{'x'.join(map(str, self.hidden))}"
        extra += "" if self.L == 20.0 else f" L{self.L:g}"
        extra += "" if self.chunking == "tensor" else " model-chunked"
        extra += "" if self.beta_init == 0.0 else f" beta0={self.beta_init:g}"
        extra += "" if self.targets is None else f" on {','.join(self.targets)}"
        extra += "" if self.alpha_lr_scale == 1.0 else f" alpha-lr x{self.alpha_lr_scale:g}"
        return f"MCNC-LoRA r{self.rank} k{self.k} d{self.d}{extra}"

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        alpha = [p for n, p in named if n.rpartition(".")[2].startswith("mcnc_alpha_")]
        rest = [p for n, p in named if not n.rpartition(".")[2].startswith("mcnc_alpha_")]
        return [{"params": alpha, "lr": lr * self.alpha_lr_scale}, {"params": rest, "lr": lr}]

    def build(self, base: nn.Module, task: Task, seed: int) -> nn.Module:
        config = MCNCConfig(k=self.k, d=self.d, hidden=self.hidden, L=self.L, seed=seed,
                            chunking=self.chunking, beta_init=self.beta_init)
        # lora_alpha left at add_mcnc_lora's default (= rank: scale 1), what a user gets
        return add_mcnc_lora(base, config, target_modules=self.targets or task.targets,
                             rank=self.rank)

    def stored_bytes(self, model: nn.Module, task: Task, work: Path) -> int:
        torch.save(model.state_dict(), work / "adapter.pt")
        return pack(work / "adapter.pt", work / "adapter.mcnc", base=work / "base.safetensors",
                    force=True).output_bytes


@dataclass(frozen=True)
class _Peft(Method):
    """A PEFT adapter; what ships is the ``adapter_model.safetensors`` of ``save_pretrained``."""

    rank: int
    targets: tuple[str, ...] | None = None  # None: all of the task's targets
    name = ""

    @property
    def label(self) -> str:
        where = "" if self.targets is None else f" on {','.join(self.targets)}"
        return f"{self.name} r{self.rank}{where}"

    def peft_config(self, targets: list[str], seed: int) -> Any:
        raise NotImplementedError

    def build(self, base: nn.Module, task: Task, seed: int) -> nn.Module:
        from peft import get_peft_model

        torch.manual_seed(seed)
        return get_peft_model(base, self.peft_config(list(self.targets or task.targets), seed))

    def stored_bytes(self, model: nn.Module, task: Task, work: Path) -> int:
        out = work / "peft"
        model.save_pretrained(out)  # type: ignore[operator]
        return (out / "adapter_model.safetensors").stat().st_size


@dataclass(frozen=True)
class PeftLora(_Peft):
    lr_start: tuple[float, ...] = (2e-3, 4e-3, 8e-3)
    family: str = "lora"
    name = "LoRA"

    def peft_config(self, targets: list[str], seed: int) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=2 * self.rank, target_modules=targets)


@dataclass(frozen=True)
class PeftVera(_Peft):
    """VeRA without its projections in the file: they are regenerated from the seed."""

    lr_start: tuple[float, ...] = (0.01, 0.02, 0.04)
    family: str = "vera"
    name = "VeRA"

    def peft_config(self, targets: list[str], seed: int) -> Any:
        from peft import VeraConfig

        return VeraConfig(r=self.rank, target_modules=targets, projection_prng_key=seed,
                          save_projection=False)


@dataclass(frozen=True)
class FullFinetune(Method):
    lr_start: tuple[float, ...] = (5e-4, 1e-3, 2e-3)
    family: str = "full"

    @property
    def label(self) -> str:
        return "full fine-tuning"

    def build(self, base: nn.Module, task: Task, seed: int) -> nn.Module:
        for p in base.parameters():
            p.requires_grad_(True)
        return base

    def stored_bytes(self, model: nn.Module, task: Task, work: Path) -> int:
        save_file(model.state_dict(), work / "full.safetensors")
        return (work / "full.safetensors").stat().st_size


def methods(task: str, quick: bool) -> tuple[list[Method], list[Method]]:
    """(the comparison, the MCNC ablations), most important first: a partial sweep covers
    those. The ablations hold the stored bytes near 4 KB and change one thing each: how the
    factors are chunked, the rank, k, L, the generator's width, beta's start."""
    if quick:
        targets = ("q_proj", "v_proj") if task == "lm" else ("fc1", "fc2")
        return [McncLora(rank=2, k=4, d=32), PeftLora(rank=1, targets=targets),
                PeftVera(rank=8), FullFinetune()], []
    ablations: list[Method] = [
        McncLora(rank=8, k=8, d=256, chunking="model"),
        McncLora(rank=4, k=8, d=128),
        McncLora(rank=8, k=4, d=128),
        McncLora(rank=8, k=8, d=256, L=5.0),
        McncLora(rank=8, k=8, d=256, hidden=(64, 64)),
        McncLora(rank=8, k=8, d=256, beta_init=0.01),
        McncLora(rank=8, k=8, d=256, alpha_lr_scale=10.0),
    ]
    if task == "lm":  # width 64, 2 blocks: LoRA rank r on all 5 targets = 2048 r values
        attention = ("q_proj", "v_proj", "o_proj")
        return [
            McncLora(rank=8, k=8, d=256),                    # ~4 KB, 14x below LoRA r8
            PeftLora(rank=1, targets=attention),              # ~4 KB
            PeftVera(rank=8, targets=attention),              # ~4 KB
            McncLora(rank=16, k=12, d=128),                  # ~16 KB
            PeftLora(rank=2),                                 # ~16 KB
            PeftVera(rank=256),                               # ~16 KB
            PeftLora(rank=8),                                 # the reference, ~64 KB
            FullFinetune(),                                   # the ceiling
            McncLora(rank=32, k=16, d=64),                   # ~64 KB
            PeftVera(rank=1536),                              # ~64 KB
            PeftLora(rank=32),                                # ~256 KB
            McncLora(rank=64, k=16, d=32),                   # ~256 KB
            PeftLora(rank=1),                                 # ~10 KB
        ], [McncLora(rank=8, k=8, d=512), McncLora(rank=16, k=8, d=512), *ablations]
    return [  # hidden 256: LoRA rank r on fc1, fc2, fc3 = 1098 r values
        McncLora(rank=8, k=8, d=256),
        PeftLora(rank=1, targets=("fc1", "fc2")),
        PeftVera(rank=128),
        McncLora(rank=16, k=12, d=128),
        PeftLora(rank=3),
        PeftVera(rank=1200),
        PeftLora(rank=8),
        FullFinetune(),
        McncLora(rank=32, k=16, d=64),
        PeftVera(rank=4000),
        PeftLora(rank=56),
        McncLora(rank=64, k=16, d=32),
        PeftLora(rank=1),
        McncLora(rank=16, k=8, d=128),
        McncLora(rank=32, k=12, d=128),
        McncLora(rank=64, k=16, d=64),
        McncLora(rank=8, k=8, d=128),                    # ~4 KB, the budget filled
        McncLora(rank=8, k=16, d=256),
    ], [*ablations, McncLora(rank=8, k=8, d=256, alpha_lr_scale=0.1),
        McncLora(rank=8, k=8, d=256, alpha_lr_scale=0.0)]


# -- one run -------------------------------------------------------------------------------
def train_once(task: Task, method: Method, lr: float, seed: int, work: Path) -> dict[str, Any]:
    """Fine-tune ``task``'s base with ``method``; the validation loss along the way (training
    time only: evaluation is not counted) and what the user would ship."""
    model = method.build(task.base(), task, seed)
    groups = method.param_groups(model, lr)
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.Adam(groups)
    steps, evals = task.schedule.steps, task.schedule.evals
    marks = {round(steps * (i + 1) / evals) for i in range(evals)}
    curve = [(0.0, task.evaluate(model)["loss"])]
    seconds = 0.0
    model.train()
    for step, (x, y) in enumerate(task.batches(seed), start=1):
        start = time.perf_counter()
        loss = task.loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds += time.perf_counter() - start
        if step in marks:
            model.eval()
            curve.append((seconds, task.evaluate(model)["loss"]))
            model.train()
    model.eval()
    figures = task.evaluate(model)
    if not math.isfinite(figures["loss"]):
        figures["loss"] = float("inf")
    return {"task": task.name, "label": method.label, "family": method.family,
            "settings": method.settings(), "lr": lr, "seed": seed, **figures,
            "trainable_values": sum(p.numel() for p in params),
            "stored_bytes": method.stored_bytes(model, task, work),
            "train_seconds": seconds, "curve": curve}


# -- the sweep -----------------------------------------------------------------------------
class Results:
    """The JSON file: every finished run under a stable key, written after each run.

    Several processes may share the file (``--task lm`` and ``--task digits`` side by side):
    each save merges, under a lock, this process's runs and tasks into what is on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"runs": {}, "tasks": {}, "machine": {}}
        self.touched: set[str] = set()
        if path.exists():
            self.data = json.loads(path.read_text())

    @staticmethod
    def key(task: str, label: str, lr: float, seed: int) -> str:
        return f"{task} | {label} | lr={lr:.6g} | seed={seed}"

    def get(self, task: str, label: str, lr: float, seed: int) -> dict[str, Any] | None:
        return self.data["runs"].get(self.key(task, label, lr, seed))

    def put(self, record: dict[str, Any]) -> None:
        key = self.key(record["task"], record["label"], record["lr"], record["seed"])
        self.data["runs"][key] = record
        self.save()

    def touch(self, task: str) -> None:
        """Mark ``task``'s entry as this process's: a save writes it over the disk's."""
        self.touched.add(task)

    def save(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                disk = json.loads(self.path.read_text())
                disk["runs"].update({k: r for k, r in self.data["runs"].items()
                                     if r["task"] in self.touched})
                disk["tasks"].update({t: self.data["tasks"][t] for t in self.touched})
                disk["machine"] = self.data["machine"]
                self.data = disk
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)


def grid_around(start: Sequence[float]) -> list[float]:
    return sorted(float(f"{v:.6g}") for v in start)


def sweep(task: Task, method: Method, results: Results, seeds: int,
          run: Callable[[float, int], dict[str, Any]], log: Callable[[str], None]
          ) -> dict[str, Any]:
    """Seed 0 over the grid, grown at an edge until its best rate is inside; then the other
    seeds at that rate. Returns the sweep's summary (grid, losses, chosen rate)."""

    def loss_at(lr: float, seed: int) -> float:
        record = results.get(task.name, method.label, lr, seed)
        if record is None:
            start = time.perf_counter()
            record = run(lr, seed)
            results.put(record)
            log(f"{task.name:6s} {method.label:40s} lr={lr:<8.4g} seed={seed} "
                f"loss={record['loss']:.4f} bytes={record['stored_bytes']:,} "
                f"({time.perf_counter() - start:.1f} s)")
        return float(record["loss"])

    grid = grid_around(method.lr_start)
    while True:
        losses = [loss_at(lr, 0) for lr in grid]
        best = min(range(len(grid)), key=lambda i: losses[i])
        if 0 < best < len(grid) - 1 or len(grid) >= MAX_GRID:
            break
        edge = grid[0] / GRID_RATIO if best == 0 else grid[-1] * GRID_RATIO
        grid = grid_around([*grid, edge])
    chosen = grid[best]
    for seed in range(1, seeds):
        loss_at(chosen, seed)
    return {"grid": grid, "losses": losses, "chosen": chosen,
            "inside": 0 < best < len(grid) - 1}


def run_sweep(results: Results, task_names: Sequence[str], quick: bool, seeds: int,
              log: Callable[[str], None]) -> None:
    tasks = make_tasks(quick)
    results.data["machine"] = machine_info()
    with tempfile.TemporaryDirectory(prefix="mcnc-quality-") as tmp:
        for name in task_names:
            task, work = tasks[name], Path(tmp) / name
            work.mkdir()
            base = task.base()
            save_file(base.state_dict(), work / "base.safetensors")
            info = {"describe": task.describe(), "base": task.evaluate(base)}
            before = results.data["tasks"].get(name, {})
            if before and (before["describe"] != json.loads(json.dumps(info["describe"]))
                           or abs(before["base"]["loss"] - info["base"]["loss"]) > 1e-4):
                raise SystemExit(f"{name}: the task or its base model differs from the one in "
                                 f"{results.path}; start a new results file (--results)")
            results.data["tasks"][name] = {**results.data["tasks"].get(name, {}), **info}
            results.touch(name)
            results.save()
            log(f"{name}: base validation loss {info['base']['loss']:.4f}")
            comparison, ablations = methods(name, quick)
            for method in comparison + ablations:
                runs = seeds if method in comparison else min(seeds, task.ablation_seeds)
                summary = sweep(task, method, results, runs,
                                lambda lr, seed, m=method, t=task, w=work:
                                train_once(t, m, lr, seed, w), log)
                results.data["tasks"][name].setdefault("sweeps", {})[method.label] = summary
                results.save()


def plan(task_names: Sequence[str], quick: bool) -> None:
    """Every configuration's stored bytes and trainable values, without training."""
    tasks = make_tasks(quick)
    with tempfile.TemporaryDirectory(prefix="mcnc-quality-") as tmp:
        for name in task_names:
            task, work = tasks[name], Path(tmp) / name
            work.mkdir()
            save_file(task.base().state_dict(), work / "base.safetensors")
            comparison, ablations = methods(name, quick)
            for method in comparison + ablations:
                model = method.build(task.base(), task, 0)
                values = sum(p.numel() for p in model.parameters() if p.requires_grad)
                print(f"{name:6s} {method.label:45s} {values:>9,} values "
                      f"{method.stored_bytes(model, task, work):>9,} bytes")


# -- summaries and figures -----------------------------------------------------------------
def summarize(results: Results) -> dict[str, list[dict[str, Any]]]:
    """Per task, per configuration at its chosen rate: mean and spread over seeds."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, info in results.data["tasks"].items():
        rows = []
        ablations = {m.label for m in methods(name, False)[1]}
        for label, sweep_info in info.get("sweeps", {}).items():
            runs = [r for r in results.data["runs"].values() if r["task"] == name
                    and r["label"] == label and r["lr"] == sweep_info["chosen"]]
            if not runs:
                continue
            losses = [r["loss"] for r in runs]
            mean = sum(losses) / len(losses)
            std = math.sqrt(sum((v - mean) ** 2 for v in losses) / max(len(losses) - 1, 1))
            row = {"label": label, "family": runs[0]["family"], "lr": sweep_info["chosen"],
                   "ablation": label in ablations,
                   "inside": sweep_info["inside"], "grid": sweep_info["grid"],
                   "seeds": len(runs), "loss_mean": mean, "loss_std": std,
                   "loss_min": min(losses), "loss_max": max(losses),
                   "stored_bytes": runs[0]["stored_bytes"],
                   "trainable_values": runs[0]["trainable_values"],
                   "payload_bytes": 4 * runs[0]["trainable_values"],
                   "train_seconds": sum(r["train_seconds"] for r in runs) / len(runs)}
            if "accuracy" in runs[0]:
                row["accuracy_mean"] = sum(r["accuracy"] for r in runs) / len(runs)
            rows.append(row)
        out[name] = sorted(rows, key=lambda r: (r["family"], r["stored_bytes"]))
    return out


def print_tables(results: Results) -> None:
    for name, rows in summarize(results).items():
        base = results.data["tasks"][name]["base"]["loss"]
        print(f"\n{name}: base validation loss {base:.4f}")
        print("| configuration | stored bytes | values | lr (grid) | val loss, mean +- std "
              "(min..max) | gain over base | train s |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            grid = f"{r['lr']:g} ({r['grid'][0]:g}..{r['grid'][-1]:g})"
            if not r["inside"]:
                grid += " EDGE"
            acc = f", acc {r['accuracy_mean']:.3f}" if "accuracy_mean" in r else ""
            label = r["label"] + (" (ablation)" if r["ablation"] else "")
            print(f"| {label} | {r['stored_bytes']:,} | {r['trainable_values']:,} | "
                  f"{grid} | {r['loss_mean']:.4f} +- {r['loss_std']:.4f} "
                  f"({r['loss_min']:.4f}..{r['loss_max']:.4f}){acc} | "
                  f"{base - r['loss_mean']:.4f} | {r['train_seconds']:.1f} |")
        print_budgets(name, rows, base)


BUDGET_SLACK = 1.25  # "at budget B": stored bytes at most 1.25 B


def print_budgets(name: str, rows: list[dict[str, Any]], base: float) -> None:
    """Per budget, each family's best configuration that fits, and the issue's targets."""
    families = [f for f in FAMILY_STYLE if any(r["family"] == f for r in rows)]
    print(f"\n{name}: best mean validation loss within each budget (stored bytes <= "
          f"{BUDGET_SLACK:g} x budget)")
    print("| budget | " + " | ".join(FAMILY_STYLE[f][0] for f in families) + " |")
    print("|---" * (len(families) + 1) + "|")
    for budget in BUDGETS:
        cells = []
        for family in families:
            fits = [r for r in rows if r["family"] == family and not r["ablation"]
                    and r["stored_bytes"] <= BUDGET_SLACK * budget]
            best = min(fits, key=lambda r: r["loss_mean"]) if fits else None
            cells.append("-" if best is None else
                         f"{best['loss_mean']:.4f} +- {best['loss_std']:.4f} "
                         f"({best['label']}, {best['stored_bytes']:,} B)")
        print(f"| {budget // 1024} KiB | " + " | ".join(cells) + " |")
    reference = next((r for r in rows if r["label"] == "LoRA r8"), None)
    if reference is None:
        return
    cheap = [r for r in rows if r["family"] == "mcnc"
             and r["stored_bytes"] * 10 <= reference["stored_bytes"]]
    for r in sorted(cheap, key=lambda r: r["stored_bytes"]):
        share = (base - r["loss_mean"]) / (base - reference["loss_mean"])
        print(f"{name}: {r['label']} ({r['seeds']} seeds): {share:.0%} of LoRA r8's gain over the "
              f"base at {reference['stored_bytes'] / r['stored_bytes']:.1f}x fewer bytes "
              f"(target: at least 75% at 14x or more)")


FAMILY_STYLE = {"mcnc": ("MCNC-LoRA", "tab:red", "o"), "lora": ("LoRA (PEFT)", "tab:blue", "s"),
                "vera": ("VeRA (PEFT)", "tab:green", "^"),
                "full": ("full fine-tuning", "black", "*")}


def plot(results: Results, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    names = list(summary)

    def panels() -> tuple[Any, list[tuple[Any, str]]]:
        fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 4.6),
                                 squeeze=False)
        return fig, list(zip(axes[0], names, strict=True))

    def save(fig: Any, filename: str) -> Path:
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=110)
        plt.close(fig)
        return out_dir / filename

    written = []
    for x_key, x_label, filename in (
            ("stored_bytes", "stored bytes (what a user ships)", "quality_loss_vs_bytes.png"),
            ("payload_bytes", "trained numbers x 4 bytes (file headers left out)",
             "quality_loss_vs_payload.png")):
        fig, axes = panels()
        for ax, name in axes:
            _loss_panel(ax, name, summary[name], results.data["tasks"][name]["base"]["loss"],
                        x_key, x_label)
        written.append(save(fig, filename))

    fig, axes = panels()
    for ax, name in axes:
        shown = sorted((r for r in summary[name] if r["label"] in _time_labels(summary[name])),
                       key=lambda r: r["stored_bytes"])
        seen: set[str] = set()
        for row in shown:
            color = FAMILY_STYLE[row["family"]][1]
            pair = sum(r["family"] == row["family"] for r in shown) > 1
            style = "--" if pair and row["family"] not in seen else "-"  # the smaller dashed
            seen.add(row["family"])
            runs = [r for r in results.data["runs"].values() if r["task"] == name
                    and r["label"] == row["label"] and r["lr"] == row["lr"]]
            curves = [r["curve"] for r in runs]
            n = min(len(c) for c in curves)
            t = [sum(c[i][0] for c in curves) / len(curves) for i in range(n)]
            v = [sum(c[i][1] for c in curves) / len(curves) for i in range(n)]
            ax.plot(t, v, marker=".", color=color, alpha=0.8, linestyle=style,
                    label=f"{row['label']} ({row['stored_bytes'] / 1024:.1f} KiB)")
        ax.set_xlabel("training seconds (1 thread, evaluation excluded; mean over seeds)")
        if results.data["tasks"][name]["base"]["loss"] > 3 * min(r["loss_min"] for r in shown):
            ax.set_yscale("log")  # the base far above the fine-tuned losses
        ax.set_ylabel("validation loss")
        ax.set_title(f"{name}: validation loss vs training time")
        ax.legend(fontsize=7)
    written.append(save(fig, "quality_loss_vs_time.png"))
    return written


def _loss_panel(ax: Any, name: str, rows: list[dict[str, Any]], base: float, x_key: str,
                x_label: str) -> None:
    """Validation loss (mean, seed min..max) against ``x_key`` per family; the ablations
    hollow; a line through each family's best configurations."""
    top = max(r["loss_max"] for r in rows)
    for family, (label, color, marker) in FAMILY_STYLE.items():
        for ablation in (False, True):
            mine = [r for r in rows if r["family"] == family and r["ablation"] == ablation]
            if not mine:
                continue
            x = [r[x_key] for r in mine]
            y = [r["loss_mean"] for r in mine]
            err = [[r["loss_mean"] - r["loss_min"] for r in mine],
                   [r["loss_max"] - r["loss_mean"] for r in mine]]
            ax.errorbar(x, y, yerr=err, fmt=marker, color=color, capsize=3,
                        markersize=5 if ablation else 6, alpha=0.85,
                        markerfacecolor="none" if ablation else color,
                        label=f"{label}, ablations (one config changed)" if ablation else label)
            if not ablation:
                front = _frontier(mine, x_key)
                ax.plot([r[x_key] for r in front], [r["loss_mean"] for r in front],
                        color=color, alpha=0.4)
    if base <= 1.5 * top:
        ax.axhline(base, color="gray", linestyle=":", label="base, not fine-tuned")
    for budget in BUDGETS if x_key == "stored_bytes" else ():
        ax.axvline(budget, color="gray", alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation loss" + (" (nats/byte)" if name == "lm" else " (cross-entropy)"))
    ax.set_title(f"{name}: validation loss (base {base:.3f}), seed min..max", fontsize=10)
    ax.legend(fontsize=7)


def _frontier(rows: list[dict[str, Any]], x_key: str) -> list[dict[str, Any]]:
    """Rows no cheaper row beats: the best loss reachable at each size."""
    out, best = [], math.inf
    for r in sorted(rows, key=lambda r: r[x_key]):
        if r["loss_mean"] < best:
            out.append(r)
            best = r["loss_mean"]
    return out


def _time_labels(rows: list[dict[str, Any]]) -> set[str]:
    """For the time plot: per family, the configurations closest to the 4 KB and 64 KB
    budgets, and full fine-tuning."""
    labels = set()
    for family in FAMILY_STYLE:
        mine = [r for r in rows if r["family"] == family and not r["ablation"]]
        for budget in (4096, 65536):
            if mine:
                labels.add(min(mine, key=lambda r: abs(math.log(r["stored_bytes"] / budget)))[
                    "label"])
    return labels


# -- entry point ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny models, 1 seed")
    parser.add_argument("--task", choices=("lm", "digits", "all"), default="all")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"the JSON (default {RESULTS.relative_to(ROOT)}; --quick: a "
                             "temporary file)")
    parser.add_argument("--plan", action="store_true", help="print stored bytes, train nothing")
    parser.add_argument("--plot", action="store_true", help="figures and tables from the JSON")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small matrices on a shared CPU: more threads only wait
    names = ("lm", "digits") if args.task == "all" else (args.task,)
    if args.plan:
        plan(names, args.quick)
        return
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)

    def log(line: str) -> None:
        print(line, flush=True)

    if args.plot:
        results = Results(args.results or RESULTS)
        print_tables(results)
        for path in plot(results, args.figures):
            print(f"wrote {path}")
        return
    if args.quick and args.results is None:
        with tempfile.TemporaryDirectory(prefix="mcnc-quality-") as tmp:
            results = Results(Path(tmp) / "quality.json")
            run_sweep(results, names, True, seeds, log)
            print_tables(results)
        return
    results = Results(args.results or RESULTS)
    run_sweep(results, names, args.quick, seeds, log)
    print_tables(results)


if __name__ == "__main__":
    main()
