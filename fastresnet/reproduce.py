"""`fastresnet reproduce EXPERIMENT`: the paper's CIFAR tables and training-curve figures, one command each.

    fastresnet reproduce table3 --data-dir ~/data                  # every run of Table 3, median of 5 per cell
    fastresnet reproduce table3 --data-dir ~/data --shard 2/4      # this machine's quarter of the same plan
    fastresnet reproduce table3 --dry-run                          # the plan and its estimated time here
    fastresnet reproduce fig1 --smoke                              # the whole pipeline on tiny synthetic data

An experiment is data (`EXPERIMENTS`): rows (a model, its keyword arguments, a dataset, a recipe and the paper's
number), seeds, and the panels of its figure. Every (row, seed) is an ordinary trainer run (`fastresnet.train`) in
its own folder, `OUT/runs/<dataset>/<model>[-kwargs]-<recipe>/seed<k>`, keyed by what is trained, so experiments
that share a run (Table 3 and Table 4 both hold the pre-activation ResNet-1001) train it once. A run folder with
`result.json` is finished and never trained again; a folder with a checkpoint resumes exactly (`--resume auto`);
SIGINT/SIGTERM stop the current run at a checkpoint and exit with 128 + the signal number. `--shard i/n` takes the
i-th of n disjoint parts of the plan, balanced by a cost that depends on the plan only (parameters × iterations ×
batch), so every machine computes the same split. A run being trained by another process (a lock in its folder) is
skipped.

Outputs in `OUT/<experiment>/`: `rows.jsonl` (one row per finished run: experiment, row, seed, test error, final
training loss, time, hardware, versions), `report.md` (the paper's table beside the reproduced median, mean ± std and
the difference), `curves.png` (training loss dashed and test error solid against iterations, as the paper's figures)
and for tables `vs_paper.png`. Documentation: docs/reproduce.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import fastresnet
from fastresnet import checkpoint, cli, train
from fastresnet.info import versions

# ---- the paper's experiments as data --------------------------------------------------------------------------------
FAIL_THRESHOLD = 20.0          # [PA] Table 1: "fail" when the test error is higher than 20%
CIFAR_TRAIN_IMAGES, CIFAR_TEST_IMAGES = 50000, 10000


@dataclass(frozen=True)
class Row:
    """One cell of a paper table (or one curve of a figure): what to train and the paper's number for it.

    paper: the paper's entry as printed ("6.61", "4.92 (4.89±0.14)", "fail"); "" where the paper gives none.
    recipe: a key of `RECIPES`.
    """

    group: str
    label: str
    model: str
    dataset: str = "cifar10"
    paper: str = ""
    model_kwargs: Tuple[Tuple[str, Any], ...] = ()
    recipe: str = "paper"

    @property
    def paper_error(self) -> Optional[float]:
        """The paper's median test error (%), None for "fail" or no entry."""
        head = self.paper.split(" ")[0]
        return float(head) if head and head != "fail" else None


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    rows: Tuple[Row, ...]
    default_runs: int
    panels: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()     # (panel title, row labels); default: one per group
    paper_only: Tuple[Tuple[str, str, str], ...] = ()        # (group, label, paper entry): rows the zoo cannot train

    def __post_init__(self) -> None:
        labels = [r.label for r in self.rows]
        if len(set(labels)) != len(labels):
            raise ValueError(f"experiment {self.name}: row labels must be unique, got {labels}")

    def panel_rows(self) -> List[Tuple[str, List[Row]]]:
        by_label = {r.label: r for r in self.rows}
        if self.panels:
            return [(title, [by_label[lb] for lb in labels]) for title, labels in self.panels]
        groups: Dict[str, List[Row]] = {}
        for r in self.rows:
            groups.setdefault(r.group, []).append(r)
        return list(groups.items())


# The paper's CIFAR recipe ([PA] appendix, "same as [1]"): the trainer's cifar10/cifar100 presets (batch 128, lr 0.1
# ÷10 at 32k and 48k iterations, 64k iterations, weight decay 1e-4, momentum 0.9, pad-4 crop + flip) plus the
# warm-up "for all CIFAR experiments": lr 0.01 for the first 400 iterations.
# "b64": Table 4's † row, mini-batch 64 with the authors' released code (resnet-1k-layers): 200 epochs of the 50k
# images (781 iterations each), lr ÷10 at the code's epochs 81 and 122 (1-based, so after 80 and 121 epochs),
# Nesterov momentum, no warm-up.
_B64_EPOCH = CIFAR_TRAIN_IMAGES // 64
RECIPES: Dict[str, Dict[str, Any]] = {
    "paper": dict(warmup_iters=400, warmup_lr=0.01),
    "b64": dict(batch_size=64, iterations=200 * _B64_EPOCH, milestones=[80 * _B64_EPOCH, 121 * _B64_EPOCH],
                nesterov=True, warmup_iters=0),
}


def _r(group: str, label: str, model: str, paper: str = "", dataset: str = "cifar10", recipe: str = "paper",
       **kwargs: Any) -> Row:
    return Row(group, label, model, dataset, paper, tuple(sorted(kwargs.items())), recipe)


_T1 = "ResNet-110, CIFAR-10"
TABLE1 = (
    _r(_T1, "original", "resnet110", "6.61"),
    _r(_T1, "constant scaling: shortcut 0, F 1 (plain net)", "resnet110_scale_shortcut", "fail", shortcut_scale=0.0),
    _r(_T1, "constant scaling: shortcut 0.5, F 1", "resnet110_scale_shortcut", "fail"),
    _r(_T1, "constant scaling: shortcut 0.5, F 0.5", "resnet110_scale_both", "12.35"),
    _r(_T1, "exclusive gating, b_g init 0", "resnet110_exclusive_gating", "fail", gate_bias=0.0),
    _r(_T1, "exclusive gating, b_g init -5", "resnet110_exclusive_gating", "fail", gate_bias=-5.0),
    _r(_T1, "exclusive gating, b_g init -6", "resnet110_exclusive_gating", "8.70"),
    _r(_T1, "exclusive gating, b_g init -7", "resnet110_exclusive_gating", "9.81", gate_bias=-7.0),
    _r(_T1, "shortcut-only gating, b_g init 0", "resnet110_shortcut_gating", "12.86", gate_bias=0.0),
    _r(_T1, "shortcut-only gating, b_g init -6", "resnet110_shortcut_gating", "6.91"),
    _r(_T1, "1x1 conv shortcut", "resnet110_conv_shortcut", "12.22"),
    _r(_T1, "dropout shortcut (0.5)", "resnet110_dropout_shortcut", "fail"),
)
_VARIANTS = (("original Residual Unit", "resnet{d}", "6.61", "5.93"),
             ("BN after addition", "resnet{d}_bn_after_add", "8.17", "6.50"),
             ("ReLU before addition", "resnet{d}_relu_before_add", "7.84", "6.14"),
             ("ReLU-only pre-activation", "resnet{d}_relu_only_preact", "6.71", "5.91"),
             ("full pre-activation", "preact_resnet{d}", "6.37", "5.46"))
TABLE2 = tuple(_r(f"ResNet-{d}, CIFAR-10", f"ResNet-{d}, {name}", model.format(d=d), p110 if d == 110 else p164)
               for d in (110, 164) for name, model, p110, p164 in _VARIANTS)
_T3 = (("CIFAR-10", "ResNet-110 (1layer skip)", "resnet110_1layer", "9.90", "8.91"),
       ("CIFAR-10", "ResNet-110", "resnet110", "6.61", "6.37"),
       ("CIFAR-10", "ResNet-164", "resnet164", "5.93", "5.46"),
       ("CIFAR-10", "ResNet-1001", "resnet1001", "7.61", "4.92"),
       ("CIFAR-100", "ResNet-164", "resnet164", "25.16", "24.33"),
       ("CIFAR-100", "ResNet-1001", "resnet1001", "27.82", "22.71"))
TABLE3 = tuple(_r(f"{ds}, {net}", f"{ds}, {net}, {unit}", model if unit == "baseline unit" else "preact_" + model,
                  base if unit == "baseline unit" else pre, ds.lower().replace("-", ""))
               for ds, net, model, base, pre in _T3 for unit in ("baseline unit", "pre-activation unit"))
TABLE4 = (
    _r("CIFAR-10", "CIFAR-10, ResNet-110 [1] (1.7M)", "resnet110", "6.61"),
    _r("CIFAR-10", "CIFAR-10, ResNet-1202 [1] (19.4M)", "resnet1202", "7.93"),
    _r("CIFAR-10", "CIFAR-10, ResNet-164 [ours] (1.7M)", "preact_resnet164", "5.46"),
    _r("CIFAR-10", "CIFAR-10, ResNet-1001 [ours] (10.2M)", "preact_resnet1001", "4.92 (4.89±0.14)"),
    _r("CIFAR-10", "CIFAR-10, ResNet-1001 [ours] (10.2M), batch 64 †", "preact_resnet1001", "4.62 (4.69±0.20)",
       recipe="b64"),
    _r("CIFAR-100", "CIFAR-100, ResNet-164 [1] (1.7M)", "resnet164", "25.16", "cifar100"),
    _r("CIFAR-100", "CIFAR-100, ResNet-1001 [1] (10.2M)", "resnet1001", "27.82", "cifar100"),
    _r("CIFAR-100", "CIFAR-100, ResNet-164 [ours] (1.7M)", "preact_resnet164", "24.33", "cifar100"),
    _r("CIFAR-100", "CIFAR-100, ResNet-1001 [ours] (10.2M)", "preact_resnet1001", "22.71 (22.68±0.22)", "cifar100"),
)
TABLE4_OTHERS = tuple((ds, name, err) for name, e10, e100 in (
    ("NIN", "8.81", "35.68"), ("DSN", "8.22", "34.57"), ("FitNet", "8.39", "35.04"), ("Highway", "7.72", "32.39"),
    ("All-CNN", "7.25", "33.71"), ("ELU", "6.55", "24.28"), ("FitNet / FitResNet, LSUV", "5.84", "27.66"))
    for ds, err in (("CIFAR-10", e10), ("CIFAR-100", e100)))
FIG1 = (_r("ResNet-1001, CIFAR-10", "ResNet-1001, original", "resnet1001", "7.61"),
        _r("ResNet-1001, CIFAR-10", "ResNet-1001, pre-activation", "preact_resnet1001", "4.92"))
FIG6 = (_r("ResNet-110: BN after addition", "ResNet-110, original", "resnet110", "6.61"),
        _r("ResNet-110: BN after addition", "ResNet-110, BN after addition", "resnet110_bn_after_add", "8.17"),
        _r("ResNet-164: pre-activation", "ResNet-164, original", "resnet164", "5.93"),
        _r("ResNet-164: pre-activation", "ResNet-164, pre-activation", "preact_resnet164", "5.46"))


def _table1_panels() -> Tuple[Tuple[str, Tuple[str, ...]], ...]:
    """Fig. 3-style panels: each family of Table 1 against the original unit."""
    families = ("constant scaling", "exclusive gating", "shortcut-only gating", "1x1 conv shortcut",
                "dropout shortcut")
    return tuple((fam, ("original",) + tuple(r.label for r in TABLE1 if r.label.startswith(fam)))
                 for fam in families)


EXPERIMENTS: Dict[str, Experiment] = {e.name: e for e in (
    Experiment("table1", "Table 1: shortcut variants on ResNet-110, CIFAR-10 (median of 5)", TABLE1, 5,
               _table1_panels()),
    Experiment("table2", "Table 2 / Fig. 4: activation placements on ResNet-110 and ResNet-164, CIFAR-10 "
               "(median of 5)", TABLE2, 5),
    Experiment("table3", "Table 3: baseline vs pre-activation units, CIFAR-10 and CIFAR-100 (median of 5)",
               TABLE3, 5),
    Experiment("table4", "Table 4: comparisons on CIFAR-10 / CIFAR-100, the rows this zoo trains (median of 5, "
               "mean±std in brackets)", TABLE4, 5, paper_only=TABLE4_OTHERS),
    Experiment("fig1", "Fig. 1: training curves of ResNet-1001, original vs pre-activation, CIFAR-10", FIG1, 1),
    Experiment("fig6", "Fig. 6: training curves, ResNet-110 original vs BN after addition and ResNet-164 original "
               "vs pre-activation, CIFAR-10", FIG6, 1),
)}

# --smoke: the same plan on the trainer's synthetic data (nothing to learn), scaled down so every experiment's whole
# pipeline runs on a CPU in seconds to a minute: 4×4 images (the three stages run at 4×4, 2×2 and 1×1, every layer
# of every net still runs), 2 iterations, evaluation at the end, no per-run curves.png (the experiment's figures are
# still drawn). The test set is one batch of synthetic images, so the evaluation costs no more than an iteration.
SMOKE = dict(image_size=4, batch_size=16, iterations=2)


# ---- the plan -------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One (row, seed) of an experiment: its trainer config (cfg.out_dir is its folder)."""

    row: Row
    seed: int
    cfg: train.TrainConfig

    @property
    def cost(self) -> float:
        """Parameters × iterations × batch: proportional to the training MACs for the CIFAR nets of the zoo (their
        MACs per image are ~146 × their parameters), and a function of the plan only, unlike a measured time."""
        return float(_param_count(self.row.model, self.row.model_kwargs)) * self.cfg.iterations * self.cfg.batch_size


def run_folder(row: Row, seed: int, smoke: bool) -> str:
    """Relative folder of a run, keyed by what it trains (shared by every experiment holding the same run)."""
    kwargs = "".join(f"-{k}={v}" for k, v in row.model_kwargs)
    return os.path.join("runs", ("smoke-" if smoke else "") + row.dataset, f"{row.model}{kwargs}-{row.recipe}",
                        f"seed{seed}")


def row_config(row: Row, seed: int, out: str, data_dir: str, smoke: bool,
               overrides: Dict[str, Any]) -> train.TrainConfig:
    """The trainer config of one run: the dataset's preset, the row's recipe, then `overrides` (device/speed options);
    with `smoke`, the schedule scaled to SMOKE's iterations on synthetic images."""
    cfg = train.resolve_config(["--preset", row.dataset])
    cfg = dataclasses.replace(cfg, **RECIPES[row.recipe], model=row.model, model_kwargs=dict(row.model_kwargs),
                              seed=seed, data_dir=data_dir, out_dir=os.path.join(out, run_folder(row, seed, smoke)),
                              **overrides)
    if smoke:
        n, scale = SMOKE["iterations"], SMOKE["iterations"] / cfg.iterations
        cfg = dataclasses.replace(
            cfg, dataset="synthetic", num_classes=10 if row.dataset == "cifar10" else 100,
            image_size=SMOKE["image_size"], batch_size=SMOKE["batch_size"], synthetic_size=SMOKE["batch_size"],
            synthetic_test_size=SMOKE["batch_size"],
            iterations=n, milestones=[m * scale for m in cfg.milestones], warmup_iters=round(cfg.warmup_iters * scale),
            log_every=1, eval_every=0, ckpt_every=0, plot=False)
    train.validate(cfg)
    return cfg


_PARAMS: Dict[Tuple[str, Tuple[Tuple[str, Any], ...]], int] = {}


def _param_count(model: str, kwargs: Tuple[Tuple[str, Any], ...]) -> int:
    """Parameters of a model built on the meta device (no memory, no arithmetic), cached: the shard cost's size."""
    key = (model, kwargs)
    if key not in _PARAMS:
        with torch.device("meta"):
            net = fastresnet.create_model(model, **dict(kwargs))
        _PARAMS[key] = sum(p.numel() for p in net.parameters())
    return _PARAMS[key]


def build_plan(exp: Experiment, runs: int, out: str, data_dir: str, smoke: bool,
               overrides: Optional[Dict[str, Any]] = None) -> List[Run]:
    """Every (row, seed) of the experiment in table order, seeds 0 … runs-1."""
    plan = []
    for row in exp.rows:
        for seed in range(runs):
            plan.append(Run(row, seed, row_config(row, seed, out, data_dir, smoke, overrides or {})))
    return plan


def parse_shard(text: str) -> Tuple[int, int]:
    """"i/n" (1 ≤ i ≤ n) -> (i, n)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected i/n with integers 1 <= i <= n (e.g. 2/4), got {text!r}") from None
    if not 1 <= i <= n:
        raise ValueError(f"--shard: expected i/n with 1 <= i <= n, got {text!r}")
    return i, n


def shard(plan: List[Run], i: int, n: int) -> List[Run]:
    """The i-th (1-based) of n disjoint parts that together are the plan: runs go, most costly first, to the part
    with the least cost so far (ties: the lower part), a split that depends on the plan only; plan order is kept."""
    if n == 1:
        return list(plan)
    loads, owner = [0.0] * n, {}
    for k in sorted(range(len(plan)), key=lambda k: (-plan[k].cost, k)):
        part = min(range(n), key=lambda p: (loads[p], p))
        loads[part] += plan[k].cost
        owner[k] = part
    return [r for k, r in enumerate(plan) if owner[k] == i - 1]


# ---- running ------------------------------------------------------------------------------------------------------
RESULT_FILE, TIME_FILE, LOCK_FILE = "result.json", "time.json", ".lock"
# fields that say how or where a run trains, not what it trains: they may differ when a run is resumed
_HOW_FIELDS = {"out_dir", "resume", "device", "backend", "channels_last", "cuda_graph", "compile", "workers",
               "log_every", "plot", "stop_at", "data_dir", "download", "config", "runs"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj: Any) -> None:
    checkpoint.write_text(path, json.dumps(obj, indent=1) + "\n")


def check_folder(run: Run) -> None:
    """Refuse a run folder that was started with a different recipe (a changed plan, or a foreign folder)."""
    saved = _read_json(os.path.join(run.cfg.out_dir, "config.json"))
    if saved is None:
        return
    planned = dataclasses.asdict(run.cfg)
    # fields the folder's trainer did not have yet are not compared: a newer trainer's defaults keep its meaning
    diff = sorted(k for k in planned if k not in _HOW_FIELDS and k in saved and saved[k] != planned[k])
    if diff:
        k = diff[0]
        raise ValueError(f"--out: the run folder {run.cfg.out_dir} was trained with {k}={saved[k]!r}, the plan "
                         f"has {k}={planned[k]!r} (differing: {', '.join(diff)}); use another --out")


def is_finished(run: Run) -> bool:
    return os.path.isfile(os.path.join(run.cfg.out_dir, RESULT_FILE))


def hardware() -> str:
    """The device a run trains on: the GPU's name, else the CPU's model and the threads torch uses."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    return f"cpu: {name}, {torch.get_num_threads()} threads"


@contextlib.contextmanager
def _lock(folder: str) -> Iterator[bool]:
    """An exclusive lock on the run folder (released when the process ends, also by a kill); yields False if another
    process holds it."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_CREAT | os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class _Stop:
    """SIGINT/SIGTERM between runs: finish nothing new, exit with 128 + signal (during a run the trainer's own
    handler checkpoints and exits the same way)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def __call__(self, signum, frame) -> None:
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            _log(f"stopped by signal {self.signum} between runs; run the same command again to continue")
            raise SystemExit(128 + self.signum)


def train_run(run: Run, stop: _Stop) -> Optional[Dict[str, Any]]:
    """Train (or resume) one run in its folder and record result.json; None if another process holds it."""
    folder = run.cfg.out_dir
    with _lock(folder) as mine:
        if not mine:
            return None
        if is_finished(run):                     # finished by another process while we waited
            return _read_json(os.path.join(folder, RESULT_FILE))
        resume = "auto" if train.has_checkpoint(folder) else ""
        trainer = train.Trainer(dataclasses.replace(run.cfg, resume=resume))
        stop.check()
        spent = (_read_json(os.path.join(folder, TIME_FILE)) or {}).get("time_s", 0.0)
        t0 = time.perf_counter()
        try:
            result = trainer.fit()
        finally:   # the time of every part of a resumed run adds up; a part refused or failed at start-up is none
            if trainer.outputs_open:
                _write_json(os.path.join(folder, TIME_FILE), {"time_s": spent + time.perf_counter() - t0})
        losses = [r["train_loss"] for r in trainer.history["log"]]
        record = {"test_err": result["test_err"], "final_train_loss": losses[-1] if losses else None,
                  "iterations": result["iteration"], "time_s": round(spent + time.perf_counter() - t0, 3),
                  "hardware": hardware(), "versions": versions(),
                  "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _write_json(os.path.join(folder, RESULT_FILE), record)
        return record


def result_row(exp: Experiment, run: Run, out: str) -> Optional[Dict[str, Any]]:
    """The data row of a finished run (None if unfinished)."""
    result = _read_json(os.path.join(run.cfg.out_dir, RESULT_FILE))
    if result is None:
        return None
    return {"experiment": exp.name, "group": run.row.group, "row": run.row.label, "seed": run.seed,
            "model": run.row.model, "model_kwargs": dict(run.row.model_kwargs), "dataset": run.cfg.dataset,
            "paper_dataset": run.row.dataset, "recipe": run.row.recipe, "batch_size": run.cfg.batch_size, **result,
            "run_dir": os.path.relpath(run.cfg.out_dir, out)}


def write_rows(exp: Experiment, plan: List[Run], out: str) -> List[Dict[str, Any]]:
    """Rewrite OUT/<experiment>/rows.jsonl from every finished run of the plan (atomically, in plan order)."""
    rows = [r for r in (result_row(exp, run, out) for run in plan) if r is not None]
    folder = os.path.join(out, exp.name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "rows.jsonl")
    checkpoint.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def execute(exp: Experiment, plan: List[Run], mine: List[Run], out: str) -> Dict[str, int]:
    """Train the runs of `mine` that are not finished, in plan order; rows.jsonl is rewritten after each."""
    counts = {"trained": 0, "finished_before": 0, "busy": 0}
    stop = _Stop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for k, run in enumerate(mine, 1):
            stop.check()
            check_folder(run)
            where = os.path.relpath(run.cfg.out_dir, out)
            if is_finished(run):
                counts["finished_before"] += 1
                _log(f"[{exp.name}] {k}/{len(mine)} finished already: {run.row.label}, seed {run.seed} ({where})")
                continue
            _log(f"[{exp.name}] {k}/{len(mine)} training: {run.row.label}, seed {run.seed} ({where})")
            if train_run(run, stop) is None:
                counts["busy"] += 1
                _log(f"[{exp.name}] {where} is being trained by another process; skipped")
                continue
            counts["trained"] += 1
            write_rows(exp, plan, out)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return counts


# ---- the report -----------------------------------------------------------------------------------------------------
def _summary(errs: List[float]) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    if not errs:
        return None, None, None
    return statistics.median(errs), statistics.fmean(errs), statistics.stdev(errs) if len(errs) > 1 else 0.0


def _verdict(row: Row, median: Optional[float], fail_rule: bool) -> str:
    """The difference column: reproduced median − paper (points); in a table that reports "fail" (Table 1: a test
    error above 20%), how a failure on either side compares."""
    if median is None:
        return ""
    if fail_rule and (row.paper == "fail" or median > FAIL_THRESHOLD):
        here = median > FAIL_THRESHOLD
        if row.paper == "fail":
            return "both fail" if here else "paper fails, here not"
        return "fails here, not in the paper"
    return f"{median - row.paper_error:+.2f}" if row.paper_error is not None else ""


def report_table(exp: Experiment, rows: List[Dict[str, Any]], runs: int) -> str:
    """Markdown: the paper's entry beside the reproduced median, mean ± std, runs done and the difference."""
    lines = ["| group | row | paper (%) | reproduced median (%) | mean ± std | runs | difference |",
             "|---|---|---|---|---|---|---|"]
    fail_rule = any(row.paper == "fail" for row in exp.rows)
    for row in exp.rows:
        errs = [r["test_err"] for r in rows if r["row"] == row.label]
        median, mean, std = _summary(errs)
        failed = fail_rule and median is not None and median > FAIL_THRESHOLD
        fmt = "—" if median is None else f"{median:.2f}" + (" (fail)" if failed else "")
        spread = "—" if mean is None else f"{mean:.2f} ± {std:.2f}"
        lines.append(f"| {row.group} | {row.label} | {row.paper or '—'} | {fmt} | {spread} | {len(errs)}/{runs} | "
                     f"{_verdict(row, median, fail_rule) or '—'} |")
    for group, label, paper in exp.paper_only:
        lines.append(f"| {group} | {label} | {paper} | not in this zoo | — | — | — |")
    return "\n".join(lines)


def write_report(exp: Experiment, plan: List[Run], rows: List[Dict[str, Any]], out: str, runs: int,
                 smoke: bool) -> str:
    """OUT/<experiment>/report.md and its figures; returns the report's path."""
    folder = os.path.join(out, exp.name)
    os.makedirs(folder, exist_ok=True)
    figures = write_figures(exp, plan, rows, folder)
    cfg = plan[0].cfg
    head = [f"# {exp.title}", ""]
    if smoke:
        head += [f"**Smoke run**: synthetic random images ({cfg.image_size}×{cfg.image_size}, nothing to learn), "
                 f"{cfg.iterations} iterations per run, batch {cfg.batch_size}. It tests the pipeline; its errors "
                 "say nothing about the paper.", ""]
    else:
        head += [f"Recipe: batch {cfg.batch_size}, {cfg.iterations} iterations, lr {cfg.lr} ÷{1 / cfg.lr_decay:g} at "
                 f"{', '.join(f'{m:g}' for m in cfg.milestones)}, weight decay {cfg.weight_decay}, momentum "
                 f"{cfg.momentum}; rows marked † use their own recipe (docs/reproduce.md).", ""]
    hw = sorted({r["hardware"] for r in rows})
    body = [report_table(exp, rows, runs), "",
            f"Finished runs: {len(rows)} of {len(plan)}; hardware: {'; '.join(hw) or '—'}. "
            f"Difference: reproduced median − paper, in points. Rows: rows.jsonl.", ""]
    body += [f"![{name}]({name})" for name in figures]
    path = os.path.join(folder, "report.md")
    checkpoint.write_text(path, "\n".join(head + body) + "\n")
    return path


def _curves(run: Run) -> Optional[Dict[str, List[float]]]:
    """(iterations, training loss) of the logged windows and (iterations, test error) of the evaluations."""
    metrics = _read_json(os.path.join(run.cfg.out_dir, "metrics.json"))
    if metrics is None:
        return None
    log, ev = metrics["log"], metrics["eval"]
    return {"log_it": [r["iteration"] for r in log], "loss": [r["train_loss"] for r in log],
            "eval_it": [r["iteration"] for r in ev], "err": [r["test_err"] for r in ev]}


def write_figures(exp: Experiment, plan: List[Run], rows: List[Dict[str, Any]], folder: str) -> List[str]:
    """curves.png (every experiment) and vs_paper.png (tables); [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("figures skipped: matplotlib is not installed (pip install 'fastresnet[train]')")
        return []
    names = [_plot_curves(plt, exp, plan, folder)]
    if exp.default_runs > 1:
        names.append(_plot_vs_paper(plt, exp, rows, folder))
    return names


def _plot_curves(plt, exp: Experiment, plan: List[Run], folder: str) -> str:
    """The paper's training-curve style: training loss dashed (left axis), test error solid (right axis), one
    colour per row, the lowest finished seed of each row."""
    panels = exp.panel_rows()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (title, prow) in zip(axes[0], panels):
        ax_err = ax.twinx()
        for k, row in enumerate(prow):
            done = [r for r in plan if r.row == row and is_finished(r)]
            c = _curves(min(done, key=lambda r: r.seed)) if done else None
            if c is None:
                continue
            colour = f"C{k}"
            ax.plot(c["log_it"], c["loss"], "--", color=colour, lw=1)
            ax_err.plot(c["eval_it"], c["err"], "-", color=colour, lw=2, marker="o" if len(c["err"]) < 3 else None,
                        label=row.label)
        ax.set(xlabel="iterations", ylabel="training loss (dashed)", title=title)
        ax_err.set_ylabel("test error % (solid)")
        ax_err.legend(fontsize=7, loc="best")
    fig.suptitle(exp.title, fontsize=9)
    fig.tight_layout()
    checkpoint.save_png(fig, os.path.join(folder, "curves.png"), dpi=110)
    plt.close(fig)
    return "curves.png"


def _plot_vs_paper(plt, exp: Experiment, rows: List[Dict[str, Any]], folder: str) -> str:
    """Per row: the paper's error (black cross; Table 1's "fail" at the 20% line), every reproduced seed (dots) and
    their median (bar)."""
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(exp.rows) + 1.2))
    for y, row in enumerate(exp.rows):
        errs = [r["test_err"] for r in rows if r["row"] == row.label]
        ax.scatter(errs, [y] * len(errs), s=14, color="C0", alpha=0.6)
        if errs:
            ax.plot([statistics.median(errs)] * 2, [y - 0.3, y + 0.3], color="C0", lw=2)
        paper = row.paper_error if row.paper != "fail" else FAIL_THRESHOLD
        if paper is not None:
            ax.scatter([paper], [y], marker="x", color="black", s=40, zorder=3)
    fail = any(row.paper == "fail" for row in exp.rows)
    if fail:
        ax.axvline(FAIL_THRESHOLD, color="grey", lw=0.8, ls=":")
    ax.set_yticks(range(len(exp.rows)), [r.label for r in exp.rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="test error (%): × paper" + (" (fail: at 20%)" if fail else "") + ", • runs, | median",
           title=exp.title)
    ax.title.set_fontsize(8)
    fig.tight_layout()
    checkpoint.save_png(fig, os.path.join(folder, "vs_paper.png"), dpi=110)
    plt.close(fig)
    return "vs_paper.png"


# ---- dry run ------------------------------------------------------------------------------------------------------
def measure_step(cfg: train.TrainConfig, batch: int) -> Tuple[float, float]:
    """(seconds per training step at cfg's batch, seconds per evaluation forward of 2·batch images), measured with
    the trainer's own step on synthetic images of the run's size at `batch` and scaled linearly to cfg's batch:
    one warm-up step, then the mean of two."""
    size = cfg.image_size or 32
    with tempfile.TemporaryDirectory() as tmp:
        classes = cfg.num_classes or (100 if cfg.dataset == "cifar100" else 10)
        probe = dataclasses.replace(cfg, dataset="synthetic", image_size=size, synthetic_size=batch,
                                    batch_size=batch, num_classes=classes, out_dir=tmp, resume="", iterations=3,
                                    plot=False)
        trainer = train.Trainer(probe)
        batches = list(trainer.batches(0))
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        trainer.train_step(*batches[0])
        sync()
        t0 = time.perf_counter()
        for x, y in batches[1:]:
            trainer.train_step(x, y)
        sync()
        step = (time.perf_counter() - t0) / (len(batches) - 1)
        trainer.model.eval()
        with torch.no_grad():
            x = torch.cat([batches[0][0], batches[1][0]])
            t0 = time.perf_counter()
            trainer.eval_net(x)
            sync()
            fwd = time.perf_counter() - t0
    return step * cfg.batch_size / batch, fwd * cfg.batch_size / batch


def _fmt_duration(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


CPU_MEASURE_BATCH = 16
# measured (step s, eval forward s) per net and setting, shared by the dry runs of one process
_MEASURED: Dict[Tuple[Any, ...], Tuple[float, float]] = {}


def dry_run(exp: Experiment, plan: List[Run], mine: List[Run], measure_batch: Optional[int]) -> str:
    """The plan (rows, runs, iterations) with the time estimated from a measured step of each net on this machine."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [f"{exp.title}", f"device: {hardware()}"]
    cfg0 = plan[0].cfg
    lines.append(f"recipe: {cfg0.dataset if cfg0.dataset == 'synthetic' else 'CIFAR'}, batch {cfg0.batch_size}, "
                 f"{cfg0.iterations} iterations, lr {cfg0.lr} (warm-up {cfg0.warmup_lr} for {cfg0.warmup_iters}), "
                 f"÷{1 / cfg0.lr_decay:g} at {', '.join(f'{m:g}' for m in cfg0.milestones)}, evaluation every "
                 f"{cfg0.eval_every or cfg0.iterations} iterations")
    header = (f"{'row':58s} {'model':28s} {'runs':>4s} {'done':>4s} {'iterations':>10s} {'step':>9s} "
              f"{'per run':>9s} {'to do':>9s}")
    lines += [header, "-" * len(header)]
    total_left, total_runs, total_iters, scaled = 0.0, 0, 0, False
    for row in exp.rows:
        runs = [r for r in mine if r.row == row]
        if not runs:
            continue
        cfg, done = runs[0].cfg, sum(is_finished(r) for r in runs)
        total_runs += len(runs)
        total_iters += cfg.iterations * len(runs)
        head = f"{row.label[:58]:58s} {row.model[:28]:28s} {len(runs):4d} {done:4d} {cfg.iterations:10d}"
        if done == len(runs):                     # nothing left to do: no need to measure
            lines.append(f"{head} {'—':>9s} {'—':>9s} {_fmt_duration(0):>9s}")
            continue
        full = device == "cuda" or cfg.dataset == "synthetic"     # CPU, real recipe: a smaller batch, scaled
        b = min(measure_batch or (cfg.batch_size if full else CPU_MEASURE_BATCH), cfg.batch_size)
        scaled |= b != cfg.batch_size
        key = (row.model, row.model_kwargs, cfg.batch_size, b, cfg.image_size, cfg.amp, cfg.channels_last,
               cfg.cuda_graph, cfg.backend, cfg.device)
        if key not in _MEASURED:
            _log(f"measuring a training step of {row.model} at batch {b} ...")
            _MEASURED[key] = measure_step(cfg, b)
        step, fwd = _MEASURED[key]
        evals = math.ceil(cfg.iterations / cfg.eval_every) if cfg.eval_every else 1
        per_run = cfg.iterations * step + evals * math.ceil(len_test_set(cfg) / (2 * cfg.batch_size)) * fwd
        total_left += per_run * (len(runs) - done)
        lines.append(f"{head} {step * 1e3:7.0f}ms {_fmt_duration(per_run):>9s} "
                     f"{_fmt_duration(per_run * (len(runs) - done)):>9s}")
    lines.append("-" * len(header))
    lines.append(f"total: {total_runs} runs of {len(plan)} in the plan, {total_iters:,} iterations; estimated "
                 f"{_fmt_duration(total_left)} to do on this machine, one run at a time")
    if scaled:
        lines.append("step: measured at a smaller batch (--measure-batch) and scaled linearly to the recipe's batch; "
                     "evaluation forwards estimated the same way")
    return "\n".join(lines)


def len_test_set(cfg: train.TrainConfig) -> int:
    """Test images a run evaluates: CIFAR's 10000, or the synthetic set's size (the trainer's rule)."""
    return max(cfg.batch_size, 1000) if cfg.dataset == "synthetic" else CIFAR_TEST_IMAGES


# ---- entry point --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastresnet reproduce", description=__doc__.split("\n\n")[0],
                                epilog="Documentation: docs/reproduce.md. " + cli.EPILOG)
    p.add_argument("experiment", choices=sorted(EXPERIMENTS), help="which table or figure of the paper")
    p.add_argument("--data-dir", default=train.TrainConfig.data_dir,
                   help="CIFAR data (the python batches or the .tar.gz); default: %(default)s")
    p.add_argument("--runs", type=int, default=None,
                   help="seeds per row (default: 5 for tables as the paper, 1 for figures; 1 with --smoke)")
    p.add_argument("--out", default=os.path.join("runs", "reproduce"),
                   help="output folder (shared by all experiments: runs/ holds the runs); default: %(default)s")
    p.add_argument("--shard", default="1/1", help="i/n: train only the i-th of n disjoint parts of the plan")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time; train nothing")
    p.add_argument("--smoke", action="store_true", help="the whole pipeline on tiny synthetic data (CI)")
    p.add_argument("--report-only", action="store_true", help="rewrite rows, report and figures; train nothing")
    p.add_argument("--measure-batch", type=int, default=None,
                   help="--dry-run: batch of the measured step (default: the recipe's on a GPU and with --smoke, "
                        f"else {CPU_MEASURE_BATCH})")
    for name in ("device", "backend", "amp"):
        f = next(f for f in dataclasses.fields(train.TrainConfig) if f.name == name)
        p.add_argument(f"--{name}", default=None, help=f"trainer option: {f.metadata.get('help', '')}")
    for name in ("channels_last", "cuda_graph"):
        p.add_argument(f"--{name.replace('_', '-')}", action="store_true", default=None,
                       help="trainer option (speed only)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    exp = EXPERIMENTS[args.experiment]
    runs = args.runs if args.runs is not None else (1 if args.smoke else exp.default_runs)
    if runs < 1:
        raise ValueError(f"--runs: expected a positive integer, got {runs}")
    if args.measure_batch is not None and args.measure_batch < 1:
        raise ValueError(f"--measure-batch: expected a positive integer, got {args.measure_batch}")
    i, n = parse_shard(args.shard)
    overrides = {k: getattr(args, k) for k in ("device", "backend", "amp", "channels_last", "cuda_graph")
                 if getattr(args, k) is not None}
    out = os.path.abspath(args.out)
    train.check_out_dir(out, "--out")
    plan = build_plan(exp, runs, out, args.data_dir, args.smoke, overrides)
    mine = shard(plan, i, n)
    if args.dry_run:
        print(dry_run(exp, plan, mine, args.measure_batch) + (f"\nshard {i}/{n}" if n > 1 else ""))
        return 0
    if not args.report_only:
        counts = execute(exp, plan, mine, out)
        _log(f"[{exp.name}] shard {i}/{n}: {counts['trained']} trained, {counts['finished_before']} finished before, "
             f"{counts['busy']} busy elsewhere")
    rows = write_rows(exp, plan, out)
    path = write_report(exp, plan, rows, out, runs, args.smoke)
    print(f"{len(rows)}/{len(plan)} runs finished; report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_command("reproduce", main, sys.argv[1:]))
