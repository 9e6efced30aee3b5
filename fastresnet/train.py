"""The trainer: docs/paper.md §5's recipe end to end, with exact resume, plots and multi-GPU through torchrun.

    python -m fastresnet.train                       # the embedded job: preact_resnet20 on scikit-learn digits
    python -m fastresnet.train --preset cifar10 --data-dir ~/data --warmup-iters 400
    torchrun --nproc_per_node=2 -m fastresnet.train --preset cifar10 --data-dir ~/data --sync-bn

Configuration: `TrainConfig` (every field is a flag, `--batch-size` for `batch_size`), resolved as dataclass defaults <
`--preset` < `--config file.json` < explicit flags, and saved as `config.json` beside the checkpoints.

The default job (preset "digits"): preact_resnet20 (0.27M parameters, the smallest CIFAR net of the paper) on the
1437 training images of scikit-learn's 8×8 digits at their native 8×8 size (the nets pool adaptively; stages run at
8×8, 4×4, 2×2), batch 64, 300 iterations (≈13 epochs), SGD momentum 0.9, weight decay 5e-4, lr 0.1 with a cosine
decay to 0 (few iterations: a cosine needs no milestone tuning), ±1-pixel translation and no flip (digits are not
mirror-symmetric). It reaches ~97–98% test accuracy (> 95% required) in well under a minute on two CPU cores.

Outputs in `out_dir`: config.json, last.pt (and prev.pt, the one before), metrics.csv, metrics.json, curves.png
(training loss, train and test error vs iterations, like the paper's figures).

Exact resume (`--resume auto` or a path): the checkpoint holds the iteration, model, optimizer (momentum buffers),
AMP scaler, RNG states and the metric history; the data order and augmentation of iteration i are pure functions of
(seed, i) (`fastresnet.data`), and the LR is a function of i, so a resumed run computes the same iterations as an
uninterrupted one (bitwise on CPU). SIGINT/SIGTERM finish the current iteration, save a checkpoint and exit with
128 + signal number (in a torchrun job the ranks agree on the stop every 10 iterations).

Distributed (torchrun sets WORLD_SIZE/RANK/LOCAL_RANK): DistributedDataParallel with NCCL on GPUs, gloo on CPUs;
`batch_size` is the global batch, split evenly; BN statistics are per device unless `--sync-bn`
(`fastresnet.distributed`). Rank 0 writes all files.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import fastresnet
from fastresnet import _startup, checkpoint, cli, data, memory
from fastresnet.backends.base import BackendUnsupportedError
from fastresnet.distributed import convert_sync_batchnorm

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DATASETS = ("digits", "cifar10", "cifar100", "imagenet", "synthetic")


def _opt(default: Any = None, help: str = "", factory: Optional[Callable[[], Any]] = None):
    """A `TrainConfig` field with its --help text."""
    meta = {"help": help}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every field is a command-line flag (underscores become dashes). Defaults: the embedded digits job."""

    preset: str = _opt("digits", "digits | cifar10 | cifar100 | imagenet: a recipe applied before the overrides")
    config: str = _opt("", "a JSON file of field values (applied after the preset, before flags)")
    dataset: str = _opt("digits", "digits | cifar10 | cifar100 | imagenet (image folder) | synthetic")
    data_dir: str = _opt("./data", "CIFAR: folder with the python batches or the .tar.gz; ImageNet: has train/, val/")
    download: bool = _opt(False, "CIFAR: fetch the archive if missing (needs a network)")
    image_size: int = _opt(0, "0: native (digits 8, CIFAR/synthetic 32, ImageNet 224)")
    synthetic_size: int = _opt(10000, "images in the synthetic training set")
    synthetic_test_size: int = _opt(1000, "images in the synthetic test set")
    model: str = _opt("preact_resnet20", "a name from fastresnet.list_models() (python -m fastresnet.profile)")
    model_kwargs: Dict[str, Any] = _opt(help="JSON, passed to create_model", factory=dict)
    num_classes: int = _opt(0, "0: the dataset's")
    batch_size: int = _opt(64, "global batch (all ranks together)")
    iterations: int = _opt(300, "training iterations (SGD steps)")
    epochs: float = _opt(0.0, "> 0: overrides iterations (ceil(epochs · iterations per epoch))")
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = _opt("cosine", "step (÷ 1/lr_decay at each milestone) | cosine (to 0) | constant")
    milestones: List[float] = _opt(help="LR decay points of the step schedule, in milestone_unit", factory=list)
    milestone_unit: str = _opt("iter", "iter | epoch")
    lr_decay: float = 0.1
    warmup_iters: int = _opt(0, "lr = warmup_lr for the first warmup_iters iterations (docs/paper.md §5.1: 400, 0.01)")
    warmup_lr: float = 0.01
    pad: int = _opt(1, "translation augmentation: zero-pad and random crop (CIFAR: 4)")
    flip: bool = _opt(False, "random horizontal flip (CIFAR: on)")
    amp: str = _opt("none", "none | bf16 | fp16 (autocast; fp16 adds a GradScaler)")
    channels_last: bool = False
    cuda_graph: bool = _opt(False, "capture the whole step (forward, backward, SGD) as one CUDA graph")
    compile: bool = _opt(False, "torch.compile the model")
    backend: str = _opt("auto", "fastresnet.set_backend")
    device: str = _opt("auto", "auto (cuda if available) | cpu | cuda")
    sync_bn: bool = _opt(False, "synchronised BN across ranks (torchrun)")
    checkpoint: str = _opt("none", "none | unit | segment: recompute residual units in backward, keeping only their "
                           "inputs (less memory, one more forward; docs/memory.md)")
    seed: int = 0
    runs: int = _opt(1, "> 1: repeat with seeds seed, seed+1, ...; report median and mean±std")
    out_dir: str = _opt("", "output folder; default: a new runs/<dataset>-<model>, suffixed -2, -3, ... if it "
                        "exists (with --resume auto: the newest such folder)")
    log_every: int = 50
    eval_every: int = _opt(50, "0: evaluate at the end only")
    ckpt_every: int = _opt(0, "0: checkpoint at the end (and on SIGINT/SIGTERM) only")
    resume: str = _opt("", "\"auto\": out_dir/last.pt (without --out-dir: in the newest runs/<dataset>-<model>[-N]); "
                       "or a checkpoint path (its folder becomes out_dir)")
    stop_at: int = _opt(0, "> 0: stop after this iteration as a kill would (checkpoint, exit)")
    workers: int = _opt(4, "image-folder loader processes")
    plot: bool = True


_CIFAR_RECIPE = dict(model="preact_resnet110", batch_size=128, iterations=64000, lr=0.1, momentum=0.9,
                     weight_decay=1e-4, schedule="step", milestones=[32000, 48000], milestone_unit="iter",
                     pad=4, flip=True, log_every=100, eval_every=2000, ckpt_every=2000)
PRESETS: Dict[str, Dict[str, Any]] = {
    "digits": {},
    "cifar10": dict(_CIFAR_RECIPE, dataset="cifar10"),
    "cifar100": dict(_CIFAR_RECIPE, dataset="cifar100"),
    # docs/paper.md §5.4: lr 0.1 ÷10 at epochs 30 and 60, batch 256; 90 epochs (fb.resnet.torch's default)
    "imagenet": dict(dataset="imagenet", model="preact_resnet200", batch_size=256, epochs=90, lr=0.1,
                     weight_decay=1e-4, schedule="step", milestones=[30, 60], milestone_unit="epoch", pad=0,
                     flip=True, log_every=100, eval_every=5000, ckpt_every=1000),
}


# ---- configuration ------------------------------------------------------------------------------------------------
class ConfigError(ValueError, RuntimeError):
    """A setting this machine or run cannot honour (e.g. --device cuda without a GPU). A ValueError, so the command
    line reports it in one line; a RuntimeError, because the value itself is valid."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """One flag per `TrainConfig` field; every default is suppressed so only given flags override."""
    p = argparse.ArgumentParser(prog="fastresnet train", description=__doc__.split("\n\n")[0],
                                argument_default=argparse.SUPPRESS, epilog=cli.EPILOG)
    defaults = TrainConfig()
    kinds = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(TrainConfig):
        help_text = "; ".join(filter(None, [f.metadata.get("help"), f"default: {getattr(defaults, f.name)!r}"]))
        if f.type == "bool":
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name == "milestones":
            p.add_argument(_flag(f.name), type=float, nargs="*", help=help_text)
        elif f.name == "model_kwargs":
            p.add_argument(_flag(f.name), type=json.loads, help=help_text)
        else:
            p.add_argument(_flag(f.name), type=kinds[f.type], help=help_text)
    return p


def resolve_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Defaults < preset < JSON config file < explicit flags (module docstring). Every value, from a flag or the file,
    passes `check_field` (the file's with its name in the message) and the whole config `validate`."""
    given = vars(build_parser().parse_args(argv))
    from_file: Dict[str, Any] = {}
    if given.get("config"):
        path = given["config"]
        try:
            with open(path) as f:
                from_file = json.load(f)
        except OSError as e:
            raise ValueError(f"--config: cannot read {path}: {e.strerror or e}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"--config: {path} is not valid JSON ({e})") from e
        if not isinstance(from_file, dict):
            raise ValueError(f"--config: {path} must hold a JSON object of TrainConfig fields")
        unknown = sorted(set(from_file) - set(FIELD_TYPES))
        if unknown:
            raise ValueError(f"--config: {path} has unknown fields {unknown}; see `fastresnet train --help`")
        for name, value in from_file.items():
            check_field(name, value, where=f" (in --config {path})")
    preset = given.get("preset", from_file.get("preset", "digits"))
    check_field("preset", preset)
    cfg = TrainConfig(**{**PRESETS[preset], **from_file, **given, "preset": preset})
    validate(cfg)
    return cfg


# The type of every field ("int", "float", "str", "bool", "List[float]", "Dict[str, Any]": the annotations as text).
FIELD_TYPES: Dict[str, str] = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
# str fields with a fixed set of values
CHOICES: Dict[str, Tuple[str, ...]] = {
    "preset": tuple(PRESETS), "dataset": DATASETS, "amp": tuple(AMP_DTYPES),
    "schedule": ("step", "cosine", "constant"), "milestone_unit": ("iter", "epoch"), "device": ("auto", "cpu", "cuda"),
    "checkpoint": ("none", "unit", "segment"), "backend": fastresnet.backends.BACKEND_NAMES,
}
# numeric fields: (lower bound, whether the bound itself is excluded); every float must also be finite
BOUNDS: Dict[str, Tuple[float, bool]] = {
    "image_size": (0, False), "synthetic_size": (1, False), "synthetic_test_size": (1, False),
    "num_classes": (0, False), "batch_size": (1, False),
    "iterations": (0, False), "epochs": (0, False), "lr": (0, True), "momentum": (0, False),
    "weight_decay": (0, False), "lr_decay": (0, True), "warmup_iters": (0, False), "warmup_lr": (0, True),
    "pad": (0, False), "runs": (1, False), "log_every": (1, False), "eval_every": (0, False),
    "ckpt_every": (0, False), "stop_at": (0, False), "workers": (0, False),
}
MAX_SEED = 2 ** 63 - 1    # the largest seed torch.manual_seed takes


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_field(name: str, value: Any, where: str = "") -> None:
    """ValueError `--<name>: expected ..., got <value><where>` unless `value` has the field's type (integers for int
    fields, finite numbers for float fields) and lies in its range (`CHOICES`, `BOUNDS`)."""
    kind = FIELD_TYPES[name]
    if kind == "bool":
        ok, expected = isinstance(value, bool), "true or false"
    elif kind == "str":
        ok, expected = isinstance(value, str), "a string"
    elif kind.startswith("Dict"):
        ok, expected = isinstance(value, dict), "a JSON object"
    elif kind.startswith("List"):
        ok = isinstance(value, list) and all(_is_number(v) and v >= 0 for v in value)
        expected = "a list of finite numbers >= 0"
    else:
        ok = _is_number(value) and (kind == "float" or isinstance(value, int))
        expected = "an integer" if kind == "int" else "a finite number"
    if name in CHOICES:
        ok, expected = ok and value in CHOICES[name], f"one of {CHOICES[name]}"
    if name in BOUNDS:
        low, strict = BOUNDS[name]
        ok = ok and (value > low if strict else value >= low)
        expected += f" {'>' if strict else '>='} {low}"
    if name == "seed":
        ok, expected = ok and 0 <= value <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"
    if not ok:
        raise ValueError(f"{_flag(name)}: expected {expected}, got {value!r}{where}")


def validate(cfg: TrainConfig) -> None:
    """Clear errors for bad values, naming the flag: every field by `check_field`, then the combinations."""
    for name in FIELD_TYPES:
        check_field(name, getattr(cfg, name))
    checks = [
        (cfg.iterations > 0 or cfg.epochs > 0, "iterations", "a positive integer (or epochs > 0)"),
        (cfg.model in fastresnet.list_models(), "model", "a name from `fastresnet profile` (fastresnet.list_models())"),
        (cfg.resume in ("", "auto") or os.path.isfile(cfg.resume), "resume", "\"auto\" or an existing checkpoint file"),
    ]
    for ok, name, expected in checks:
        if not ok:
            raise ValueError(f"{_flag(name)}: expected {expected}, got {getattr(cfg, name)!r}")
    if cfg.nesterov and cfg.momentum <= 0:
        raise ValueError(f"--nesterov: needs --momentum > 0, got {cfg.momentum!r}")
    if cfg.cuda_graph and cfg.amp == "fp16":
        raise ValueError("--cuda-graph: not with --amp fp16 (the GradScaler's inf check syncs the host); use bf16")
    if cfg.cuda_graph and cfg.compile:
        raise ValueError("--cuda-graph: not with --compile (torch.compile(mode='reduce-overhead') makes its own "
                         "graphs)")
    if cfg.out_dir:
        check_out_dir(cfg.out_dir)


def check_out_dir(path: str, flag: str = "--out-dir") -> None:
    """ValueError naming `flag` unless `path` is a folder, or can be made one, that this process may write into;
    creates nothing."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag}: cannot use {path}: {probe} exists and is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot use {path}: no permission to write into {probe}")


# ---- helpers ------------------------------------------------------------------------------------------------------
def lr_at(cfg: TrainConfig, it: int, total: int, steps_per_epoch: int) -> float:
    """The learning rate of iteration `it` (0-based): warm-up, then the step / cosine / constant schedule."""
    if it < cfg.warmup_iters:
        return cfg.warmup_lr
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * it / total))
    if cfg.schedule == "step":
        scale = steps_per_epoch if cfg.milestone_unit == "epoch" else 1
        return cfg.lr * cfg.lr_decay ** sum(it >= m * scale for m in cfg.milestones)
    return cfg.lr


def rng_state() -> Dict[str, Any]:
    """Every RNG the step may use (dropout-style layers), as uint8 tensors so weights_only loading works."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# the files a run writes into out_dir
OUTPUT_FILES = ("config.json", "last.pt", "prev.pt", "metrics.csv", "metrics.json", "curves.png")
# config fields a checkpoint must agree with: what is trained and in which order
RESUME_KEYS = ("dataset", "model", "model_kwargs", "num_classes", "image_size", "batch_size", "seed")


# ---- the trainer --------------------------------------------------------------------------------------------------
class Trainer:
    """Sets up data, model, optimizer, AMP, CUDA graph and DDP from a `TrainConfig`; `fit()` runs the job."""

    def __init__(self, cfg: TrainConfig):
        validate(cfg)
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        self.device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
        if cfg.cuda_graph and self.device.type != "cuda":
            raise ConfigError("--cuda-graph: needs a CUDA device (this run is on the CPU)")
        if cfg.cuda_graph and self.world > 1:
            raise ConfigError("--cuda-graph: single-process runs only (DDP capture is not supported here)")
        if cfg.backend != "auto":
            try:
                fastresnet.backends.resolve(torch.zeros(1, 1, 1, 1, device=self.device), cfg.backend)
            except BackendUnsupportedError as e:
                raise ConfigError(f"--backend {cfg.backend}: {e}") from e
        # a checkpoint of another job is refused before anything is set up (or written: nothing is, before the
        # first save)
        self._resume = self.read_checkpoint(cfg.resume) if cfg.resume else None
        if want_cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if want_cuda else "gloo")
        fastresnet.set_backend(cfg.backend)
        torch.manual_seed(cfg.seed)

        self._setup_data()
        self.total = cfg.iterations if cfg.epochs <= 0 else math.ceil(cfg.epochs * self.steps_per_epoch)
        self._setup_model()
        self.history: Dict[str, List[Any]] = {"loss": [], "wrong": [], "log": [], "eval": []}
        self.iteration = 0
        self._stop_signal: Optional[int] = None
        self._graph = None
        self.cfg = with_out_dir(cfg)                        # a no-op when run() has chosen it
        self.outputs_open = False    # whether this run has written into out_dir: config.json, at the first save

    def _open_outputs(self) -> None:
        """Before the first file of this run (rank 0): create out_dir, remove what killed writers of the trainer's
        files left there, write config.json. Nothing is written earlier, so a run that cannot start or is refused
        leaves the file system as it was."""
        if self.outputs_open:
            return
        out = self.cfg.out_dir
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out-dir: cannot create {out}: {e.strerror or e}") from e
        for name in OUTPUT_FILES:
            for tmp in checkpoint.stale_temporaries(os.path.join(out, name)):
                os.unlink(tmp)
        checkpoint.write_text(os.path.join(out, "config.json"), json.dumps(asdict(self.cfg), indent=2) + "\n")
        self.outputs_open = True

    # -- setup -----------------------------------------------------------------------------------------------------
    def _setup_data(self) -> None:
        cfg = self.cfg
        self.folder = None
        if cfg.dataset == "digits":
            train, test = data.load_digits(cfg.image_size or 8)
        elif cfg.dataset in ("cifar10", "cifar100"):
            train, test = data.load_cifar(cfg.data_dir, 10 if cfg.dataset == "cifar10" else 100, cfg.download)
        elif cfg.dataset == "synthetic":
            n_cls = cfg.num_classes or 10
            train = data.synthetic(cfg.synthetic_size, n_cls, cfg.image_size or 32, seed=1)
            test = data.synthetic(cfg.synthetic_test_size, n_cls, cfg.image_size or 32, seed=2)
        else:
            size = cfg.image_size or 224
            self.folder = (data.ImageFolder(os.path.join(cfg.data_dir, "train"), size, True, cfg.seed),
                           data.ImageFolder(os.path.join(cfg.data_dir, "val"), size, False))
            train = test = None
        if train is not None:
            if cfg.image_size and cfg.dataset != "digits" and cfg.image_size != train.images.shape[-1]:
                raise ValueError(f"--image-size: {cfg.dataset} images are {train.images.shape[-1]} pixels, "
                                 f"got {cfg.image_size}")
            self.train_data, self.test_data = train.to(self.device), test.to(self.device)
            n_train, self.num_classes = len(train), train.num_classes
        else:
            n_train, self.num_classes = len(self.folder[0]), len(self.folder[0].classes)
            self.norm = data.IMAGENET_MEAN_STD
        self.sampler = data.IterationSampler(n_train, cfg.batch_size, cfg.seed, self.world, self.rank)
        self.steps_per_epoch = self.sampler.steps_per_epoch

    def _setup_model(self) -> None:
        cfg = self.cfg
        try:
            model = fastresnet.create_model(cfg.model, num_classes=cfg.num_classes or self.num_classes,
                                            **cfg.model_kwargs).to(self.device)
        except TypeError as e:
            if not cfg.model_kwargs:
                raise
            raise ValueError(f"--model-kwargs: {cfg.model} does not take them ({e})") from e
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.checkpoint != "none":
            if not hasattr(model, "set_checkpoint"):
                raise ValueError(f"--checkpoint: {cfg.model} has no recomputation modes (fastresnet ResNets do)")
            model.set_checkpoint(cfg.checkpoint, model.segment_size if cfg.checkpoint == "segment" else None)
        self.memory_plan = self._plan_memory(model)
        if cfg.sync_bn and self.world > 1:
            model = convert_sync_batchnorm(model)
        self.model = model                                  # the parameters' owner: checkpoints, evaluation
        lr = torch.tensor(cfg.lr, device=self.device) if cfg.cuda_graph else cfg.lr
        # fused SGD takes the LR as a device tensor, so a captured graph reads the current LR at every replay
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                                         fused=True if cfg.cuda_graph else None)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        net = torch.compile(model) if cfg.compile else model
        self.eval_net = net
        if self.world > 1:
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.net = net

    def _plan_memory(self, model: nn.Module) -> Optional[memory.MemoryPlan]:
        """The planner's peak memory of one rank's training step, logged (rank 0); None for nets it does not
        model (the reason is logged)."""
        cfg = self.cfg
        size = self.train_data.images.shape[-1] if self.folder is None else (cfg.image_size or 224)
        dtype = "fp32" if cfg.amp == "none" else "bf16"  # fp16 activations take the bytes of bf16 ones
        try:
            plan = memory.plan(model, max(cfg.batch_size // self.world, 1), size, dtype,
                               optimizer_states=1 if cfg.momentum else 0)
        except ValueError as e:
            if self.rank == 0:
                _log(f"memory plan: none ({e})")
            return None
        if self.rank == 0:
            mib = {k: getattr(plan, f"{k}_bytes") / 2**20 for k in ("peak", "params", "optimizer", "saved",
                                                                     "transient")}
            _log(f"memory plan (checkpoint {plan.checkpoint}, batch {plan.batch} per rank, {size}², {dtype}): peak "
                 f"{mib['peak']:.1f} MiB = parameters {mib['params']:.1f} + optimizer {mib['optimizer']:.1f} + "
                 f"saved activations {mib['saved']:.1f} + transient (gradients included) {mib['transient']:.1f} + "
                 f"input")
        return plan

    def _report_memory(self) -> None:
        """Log the peak memory the run used beside the plan (rank 0); kept in `self.memory_used`."""
        if self.device.type == "cuda":
            used, what = torch.cuda.max_memory_allocated(self.device), "torch.cuda.max_memory_allocated"
        else:
            used, what = memory.process_peak_rss(), "peak RSS of the whole process: libraries, data, evaluation"
        self.memory_used = used
        if self.rank == 0:
            planned = "" if self.memory_plan is None else f"; planned peak {self.memory_plan.peak_bytes / 2**20:.1f} MiB"
            _log(f"memory used: {used / 2**20:.1f} MiB ({what}){planned}")

    # -- data ------------------------------------------------------------------------------------------------------
    def _prepare(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def batches(self, start: int) -> Iterator[Tuple[Tensor, Tensor]]:
        """(images fp32 [B/world, C, H, W], labels [B/world]) on the device for iterations start, start+1, ..."""
        cfg, part = self.cfg, self.sampler.rank_slice()
        if self.folder is not None:
            yield from self._folder_batches(start)
            return
        for i in range(start, self.total):
            idx = self.sampler.indices(i)[part].to(self.device, non_blocking=True)
            x = self.train_data.normalise(self.train_data.images[idx])
            if cfg.pad or cfg.flip:
                params = data.draw_augment(cfg.batch_size, cfg.pad, cfg.flip, cfg.seed, i)[part]
                x = data.augment_batch(x, cfg.pad, params)
            yield self._prepare(x), self.train_data.labels[idx]

    def _folder_batches(self, start: int) -> Iterator[Tuple[Tensor, Tensor]]:
        part, sampler = self.sampler.rank_slice(), self.sampler
        keyed = [[(int(j), i * 2 ** 20 + k) for k, j in enumerate(sampler.indices(i)[part])]
                 for i in range(start, self.total)]
        loader = torch.utils.data.DataLoader(self.folder[0], batch_sampler=keyed, num_workers=self.cfg.workers,
                                             collate_fn=data.collate_uint8, pin_memory=self.device.type == "cuda")
        mean, std = (torch.tensor(v, device=self.device).view(1, -1, 1, 1) for v in self.norm)
        for x, y in loader:
            x = (x.to(self.device, non_blocking=True).float() / 255 - mean) / std
            yield self._prepare(x), y.to(self.device, non_blocking=True)

    # -- one step --------------------------------------------------------------------------------------------------
    def _autocast(self):
        dtype = AMP_DTYPES[self.cfg.amp]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _step(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """Forward, backward, SGD on one batch; returns (loss, number misclassified) as device scalars."""
        self.optimizer.zero_grad(set_to_none=not self.cfg.cuda_graph)
        with self._autocast():
            out = self.net(x)
            loss = F.cross_entropy(out.float(), y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach(), (out.argmax(1) != y).sum()

    def _capture(self, x: Tensor, y: Tensor) -> None:
        """Capture `_step` as one CUDA graph on static inputs (docs/architecture.md §4). Three warm-up steps on a side
        stream allocate the gradients and momentum buffers; the model and optimizer state is restored afterwards,
        so capturing changes no result (a zero momentum buffer gives the same first SGD step as none)."""
        saved_model = {k: v.clone() for k, v in self.model.state_dict().items()}
        saved_opt = {id(p): s["momentum_buffer"].clone() for p, s in self.optimizer.state.items()
                     if s.get("momentum_buffer") is not None}
        self._static = (x.clone(), y.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(*self._static)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(saved_model[k])
            for p, s in self.optimizer.state.items():
                buf = s["momentum_buffer"]
                buf.copy_(saved_opt[id(p)]) if id(p) in saved_opt else buf.zero_()
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_out = self._step(*self._static)

    def train_step(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        if not self.cfg.cuda_graph:
            return self._step(x, y)
        if self._graph is None:
            self._capture(x, y)
        self._static[0].copy_(x)
        self._static[1].copy_(y)
        self._graph.replay()
        return self._static_out[0].clone(), self._static_out[1].clone()

    def set_lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(value)
            else:
                group["lr"] = value

    # -- evaluation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Test error (%) and loss of the eval-mode model on the whole test set (sharded over ranks)."""
        self.model.eval()
        wrong = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_sum, count = torch.zeros_like(wrong), torch.zeros_like(wrong)
        for x, y in self._test_batches():
            with self._autocast():
                out = self.eval_net(self._prepare(x)).float()
            wrong += (out.argmax(1) != y).sum()
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            count += y.numel()
        if self.world > 1:
            stats = torch.stack([wrong, loss_sum, count])
            dist.all_reduce(stats)
            wrong, loss_sum, count = stats
        self.model.train()
        return {"test_err": 100.0 * float(wrong / count), "test_loss": float(loss_sum / count)}

    def _test_batches(self) -> Iterator[Tuple[Tensor, Tensor]]:
        bs = max(self.cfg.batch_size // self.world, 1) * 2
        if self.folder is not None:
            shard = torch.utils.data.Subset(self.folder[1], range(self.rank, len(self.folder[1]), self.world))
            loader = torch.utils.data.DataLoader(shard, batch_size=bs, num_workers=self.cfg.workers,
                                                 collate_fn=data.collate_uint8)
            mean, std = (torch.tensor(v, device=self.device).view(1, -1, 1, 1) for v in self.norm)
            for x, y in loader:
                yield (x.to(self.device).float() / 255 - mean) / std, y.to(self.device)
            return
        idx = torch.arange(self.rank, len(self.test_data), self.world, device=self.device)
        for s in range(0, idx.numel(), bs):
            part = idx[s:s + bs]
            yield self.test_data.normalise(self.test_data.images[part]), self.test_data.labels[part]

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        return {"version": 1, "iteration": self.iteration, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "rng": rng_state(), "config": asdict(self.cfg), "history": self.history, "world_size": self.world}

    def save_checkpoint(self) -> Optional[str]:
        """Rank 0 writes out_dir/last.pt atomically, keeping the previous one as prev.pt; all ranks wait for it."""
        path = None
        if self.rank == 0:
            self._open_outputs()
            path = os.path.join(self.cfg.out_dir, "last.pt")
            checkpoint.save(self.state(), path, previous=os.path.join(self.cfg.out_dir, "prev.pt"))
        if self.world > 1:
            dist.barrier()
        return path

    def read_checkpoint(self, path: str) -> Tuple[str, Dict[str, Any]]:
        """(path, checkpoint) of `path` ("auto": `resume_path(out_dir)`), checked: `CheckpointError` if it is not a
        training state or was trained with other `RESUME_KEYS` values than this run's."""
        if path == "auto":
            path = resume_path(with_out_dir(self.cfg).out_dir)   # (a resume's folder: chosen, never made)
        ckpt = checkpoint.load(path, map_location=self.device)
        problem = _state_problem(ckpt)
        if problem:
            raise checkpoint.CheckpointError(f"checkpoint {path}: not a fastresnet training state ({problem})")
        saved = ckpt["config"]
        for key in RESUME_KEYS:
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise checkpoint.CheckpointError(
                    f"checkpoint {path}: was trained with {key}={saved[key]!r}, this run has "
                    f"{key}={getattr(self.cfg, key)!r}; an exact resume needs the same value")
        return path, ckpt

    def load_checkpoint(self, path: str) -> None:
        """Restore everything `state()` saved; the job then continues exactly where the checkpoint was taken. A
        checkpoint of another job, or one whose contents do not fit this model, raises `CheckpointError` before
        anything is restored."""
        self._restore(*self.read_checkpoint(path))

    def _restore(self, path: str, ckpt: Dict[str, Any]) -> None:
        model_keys = self.model.state_dict()
        wrong = [k for k, v in ckpt["model"].items() if k not in model_keys or v.shape != model_keys[k].shape]
        missing = [k for k in model_keys if k not in ckpt["model"]]
        if wrong or missing:
            raise checkpoint.CheckpointError(
                f"checkpoint {path}: its model does not fit {self.cfg.model} with these settings (unexpected or "
                f"differently shaped: {wrong[:3]}, missing: {missing[:3]})")
        try:
            self.model.load_state_dict(ckpt["model"])
            lr_tensors = [g["lr"] for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(ckpt["optimizer"])
            for group, lr in zip(self.optimizer.param_groups, lr_tensors):
                group["lr"] = lr                             # keep our own (possibly device-tensor) LR
            if self.scaler is not None and ckpt["scaler"]:
                self.scaler.load_state_dict(ckpt["scaler"])
            set_rng_state({k: (v.cpu() if isinstance(v, Tensor) else [t.cpu() for t in v])
                           for k, v in ckpt["rng"].items()})
        except (RuntimeError, ValueError, KeyError, TypeError) as e:   # what torch's loaders raise on bad contents
            raise checkpoint.CheckpointError(f"checkpoint {path}: cannot be restored ({type(e).__name__}: "
                                             f"{str(e).splitlines()[0] if str(e) else ''})") from e
        self.history = ckpt["history"]
        self.iteration = ckpt["iteration"]
        if self.rank == 0:
            _log(f"resumed from {path} at iteration {self.iteration}")

    # -- outputs ---------------------------------------------------------------------------------------------------
    def write_metrics(self) -> None:
        """metrics.json (everything, per-iteration losses included) and metrics.csv (one row per logged or
        evaluated iteration); rank 0 only."""
        if self.rank != 0:
            return
        out = self.cfg.out_dir
        rows: Dict[int, Dict[str, Any]] = {}
        for r in self.history["log"]:
            rows.setdefault(r["iteration"], {}).update(r)
        for r in self.history["eval"]:
            rows.setdefault(r["iteration"], {}).update(r)
        fields = ["iteration", "epoch", "lr", "train_loss", "train_err", "test_err", "test_loss", "images_per_s",
                  "elapsed_s"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for it in sorted(rows):
            w.writerow({"iteration": it, **rows[it]})
        checkpoint.write_text(os.path.join(out, "metrics.csv"), buf.getvalue())
        checkpoint.write_text(os.path.join(out, "metrics.json"), json.dumps(
            {"config": asdict(self.cfg), "log": self.history["log"], "eval": self.history["eval"],
             "iteration_loss": self.history["loss"]}) + "\n")

    def plot(self) -> Optional[str]:
        """curves.png: train error (dashed) and test error (bold) in % vs iterations, and the training loss."""
        if self.rank != 0 or not self.cfg.plot or not self.history["log"]:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            _log("plot skipped: matplotlib is not installed (pip install 'fastresnet[train]')")
            return None
        log, ev = self.history["log"], self.history["eval"]
        fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
        ax_err.plot([r["iteration"] for r in log], [r["train_err"] for r in log], "--", label="train error")
        if ev:
            ax_err.plot([r["iteration"] for r in ev], [r["test_err"] for r in ev], "-o", lw=2, ms=3,
                        label="test error")
        ax_err.set(xlabel="iterations", ylabel="error (%)", title=f"{self.cfg.model} on {self.cfg.dataset}")
        ax_err.legend()
        ax_loss.plot(range(1, len(self.history["loss"]) + 1), self.history["loss"], lw=0.5, alpha=0.5,
                     label="per iteration")
        ax_loss.plot([r["iteration"] for r in log], [r["train_loss"] for r in log], label="window mean")
        ax_loss.set(xlabel="iterations", ylabel="training loss", yscale="log")
        ax_loss.legend()
        fig.tight_layout()
        path = os.path.join(self.cfg.out_dir, "curves.png")
        checkpoint.save_png(fig, path, dpi=120)
        plt.close(fig)
        return path

    # -- the loop --------------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _should_stop(self, it: int) -> bool:
        """Whether a signal asked to stop; in a torchrun job the ranks agree (MAX all-reduce) every 10 iterations."""
        if self.world == 1:
            return self._stop_signal is not None
        if it % 10 and it != self.total:
            return False
        flag = torch.tensor([self._stop_signal or 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self._stop_signal is None:
            self._stop_signal = int(flag.item())
        return bool(flag.item())

    def fit(self) -> Dict[str, Any]:
        """Train to `total` iterations (from the checkpoint if `resume`); returns the final metrics."""
        if self._resume is not None:
            self._restore(*self._resume)
            self._resume = None
        handlers = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: no signal handling
            handlers = {}
        try:
            return self._loop()
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)

    def _loop(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        window: List[Tuple[Tensor, Tensor]] = []
        t0 = t_win = time.perf_counter()
        start = self.iteration
        stopped = None
        for x, y in self.batches(self.iteration):
            it = self.iteration
            self.set_lr(lr_at(cfg, it, self.total, self.steps_per_epoch))
            window.append(self.train_step(x, y))
            self.iteration = it + 1
            done = self.iteration
            if done % cfg.log_every == 0 or done == self.total:
                self._flush(window, t_win, t0, start)
                window, t_win = [], time.perf_counter()
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == self.total:
                self.history["eval"].append({"iteration": done, **self.evaluate()})
                if self.rank == 0:
                    e = self.history["eval"][-1]
                    _log(f"eval it {done}: test error {e['test_err']:.2f}%  test loss {e['test_loss']:.4f}")
            if self._should_stop(done):
                stopped = f"signal {self._stop_signal}"
            elif cfg.stop_at and done == cfg.stop_at and done < self.total:
                stopped = f"stop_at {done}"
            if stopped or (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == self.total:
                self._flush(window, t_win, t0, start)
                window, t_win = [], time.perf_counter()
                path = self.save_checkpoint()
                self.write_metrics()
                if stopped or done == self.total:
                    self.plot()
                if stopped:
                    if self.rank == 0:
                        _log(f"stopped after iteration {done} ({stopped}); outputs in {cfg.out_dir}; continue with "
                             f"--resume {path}")
                    if self._stop_signal is not None:
                        raise SystemExit(128 + self._stop_signal)
                    break
        self._report_memory()
        final = self.history["eval"][-1] if self.history["eval"] and not stopped else {}
        return {"iteration": self.iteration, "stopped": bool(stopped), **final,
                "test_acc": 100.0 - final["test_err"] if final else None, "time_s": time.perf_counter() - t0}

    def _flush(self, window: List[Tuple[Tensor, Tensor]], t_win: float, t0: float, start: int) -> None:
        """Move the window's losses to the host (one sync), record them, log a progress line."""
        if not window:
            return
        vals = torch.stack([torch.stack([l.double(), w.double()]) for l, w in window])   # [K, 2]
        if self.world > 1:  # global-batch values: mean of the ranks' losses, total misclassified
            dist.all_reduce(vals)
            vals[:, 0] /= self.world
        vals = vals.tolist()
        self.history["loss"].extend(v[0] for v in vals)
        self.history["wrong"].extend(int(v[1]) for v in vals)
        now = time.perf_counter()
        ips = len(window) * self.cfg.batch_size / max(now - t_win, 1e-9)
        row = {"iteration": self.iteration, "epoch": round(self.sampler.epoch_of(self.iteration), 3),
               "lr": lr_at(self.cfg, self.iteration - 1, self.total, self.steps_per_epoch),
               "train_loss": sum(v[0] for v in vals) / len(vals),
               "train_err": 100.0 * sum(v[1] for v in vals) / (len(vals) * self.cfg.batch_size),
               "images_per_s": round(ips, 1), "elapsed_s": round(now - t0, 2)}
        self.history["log"].append(row)
        if self.rank == 0:
            eta = (self.total - self.iteration) * (now - t0) / max(self.iteration - start, 1)
            _log(f"it {self.iteration}/{self.total} | loss {row['train_loss']:.4f} | train err "
                 f"{row['train_err']:.1f}% | lr {row['lr']:.4g} | {ips:.0f} img/s | ETA {_fmt_time(eta)}")


def _state_problem(ckpt: Dict[str, Any]) -> str:
    """What is wrong with the structure of a loaded checkpoint ("" if nothing): the types `Trainer.state` writes."""
    def is_dict_of(v, kind):
        return isinstance(v, dict) and all(isinstance(x, kind) for x in v.values())
    history = ckpt.get("history")
    rng = ckpt.get("rng")
    expected = [
        ("iteration", isinstance(ckpt.get("iteration"), int) and not isinstance(ckpt.get("iteration"), bool)
         and ckpt["iteration"] >= 0, "an integer >= 0"),
        ("model", is_dict_of(ckpt.get("model"), Tensor), "a dict of tensors"),
        ("optimizer", isinstance(ckpt.get("optimizer"), dict) and {"state", "param_groups"} <= set(ckpt["optimizer"]),
         "an optimizer state dict"),
        ("scaler", isinstance(ckpt.get("scaler"), dict), "a dict"),
        ("rng", isinstance(rng, dict) and isinstance(rng.get("torch"), Tensor) and rng["torch"].dtype == torch.uint8,
         "a dict with a uint8 'torch' state"),
        ("config", isinstance(ckpt.get("config"), dict), "a dict"),
        ("history", isinstance(history, dict) and all(isinstance(history.get(k), list)
                                                      for k in ("loss", "wrong", "log", "eval")),
         "a dict of the lists loss, wrong, log, eval"),
    ]
    return "; ".join(f"{key}: expected {what}" for key, ok, what in expected if not ok)


# ---- entry point --------------------------------------------------------------------------------------------------
RUNS_ROOT = "runs"


def _run_folders(base: str) -> List[str]:
    """The existing folders base, base-2, base-3, ... in that order."""
    parent, name = os.path.split(base)
    found = {1: base} if os.path.isdir(base) else {}
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        suffix = entry[len(name) + 1:] if entry.startswith(name + "-") else ""
        if suffix.isdigit() and int(suffix) >= 2 and os.path.isdir(os.path.join(parent, entry)):
            found[int(suffix)] = os.path.join(parent, entry)
    return [found[k] for k in sorted(found)]


def has_checkpoint(folder: str) -> bool:
    """Whether `folder` holds a checkpoint of the trainer (last.pt or prev.pt)."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("last.pt", "prev.pt"))


def resume_path(folder: str) -> str:
    """The checkpoint `--resume auto` continues from in `folder`: last.pt, or prev.pt where only that exists."""
    last, prev = os.path.join(folder, "last.pt"), os.path.join(folder, "prev.pt")
    return last if os.path.exists(last) or not os.path.exists(prev) else prev


def with_out_dir(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with `out_dir` chosen when it is empty: `--resume PATH` continues in PATH's folder, `--resume auto` in
    the newest runs/<dataset>-<model>[-N] that holds a checkpoint, and a new run gets a new folder,
    runs/<dataset>-<model> or the first free -2, -3, ... suffix, created here by rank 0 (os.mkdir fails on an
    existing folder, so two runs started at once never share one). Other ranks of a new run never write files: the
    name they get is not used."""
    if cfg.out_dir:
        return cfg
    if cfg.resume and cfg.resume != "auto":
        return dataclasses.replace(cfg, out_dir=os.path.dirname(cfg.resume) or ".")
    base = os.path.join(RUNS_ROOT, f"{cfg.dataset}-{cfg.model}")
    if cfg.resume == "auto":
        folders = [f for f in _run_folders(base) if has_checkpoint(f)]
        if not folders:
            raise ValueError(f"--resume auto: no earlier run with a checkpoint in {base} (or {base}-N); pass the "
                             "run's folder with --out-dir, or a checkpoint path with --resume")
        return dataclasses.replace(cfg, out_dir=folders[-1])
    if int(os.environ.get("RANK", "0")) != 0:
        return dataclasses.replace(cfg, out_dir=base)
    os.makedirs(RUNS_ROOT, exist_ok=True)
    path, k = base, 1
    while True:
        try:
            os.mkdir(path)
            return dataclasses.replace(cfg, out_dir=path)
        except FileExistsError:
            k += 1
            path = f"{base}-{k}"


def run(cfg: TrainConfig) -> Dict[str, Any]:
    """Train `cfg.runs` times (seeds seed, seed+1, ...; out_dir/run<k> when runs > 1); returns the final metrics
    with the output folder ("out_dir"), and for several runs the median and mean ± std of the test error, as the
    paper reports. A folder made here for a new run (and runs/, if made for it) is removed again if the run fails
    before writing into it: the trainer writes nothing before its first checkpoint."""
    new_folder = not cfg.out_dir and not cfg.resume and int(os.environ.get("RANK", "0")) == 0
    new_root = new_folder and not os.path.isdir(RUNS_ROOT)
    cfg = with_out_dir(cfg)
    made = [f for f, new in ((RUNS_ROOT, new_root), (cfg.out_dir, new_folder)) if new]
    _startup.made_folders.extend(made)                     # an interrupt at start-up removes them too
    try:
        return {**_run_all(cfg), "out_dir": cfg.out_dir}
    except BaseException:
        _startup.remove_empty(made)
        raise
    finally:
        for folder in made:
            _startup.made_folders.remove(folder)


def _run_all(cfg: TrainConfig) -> Dict[str, Any]:
    if cfg.runs == 1:
        return Trainer(cfg).fit()
    results = []
    for k in range(cfg.runs):
        sub = dataclasses.replace(cfg, seed=cfg.seed + k, runs=1, out_dir=os.path.join(cfg.out_dir, f"run{k}"))
        results.append(Trainer(sub).fit())
    errs = [r["test_err"] for r in results if r.get("test_err") is not None]
    summary = {"runs": results, "test_err": errs, "median": statistics.median(errs),
               "mean": statistics.fmean(errs), "std": statistics.stdev(errs) if len(errs) > 1 else 0.0}
    if int(os.environ.get("RANK", "0")) == 0:
        checkpoint.write_text(os.path.join(cfg.out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`fastresnet train`: train, print the result; the last line names the output folder (a run stopped by a signal
    ends in the trainer's log line that names its checkpoint instead). Exit codes: `fastresnet.cli.run_command`."""
    cfg = resolve_config(argv)
    try:
        result = run(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        if "median" in result:
            print(f"test error over {cfg.runs} runs: median {result['median']:.2f}%, mean "
                  f"{result['mean']:.2f} ± {result['std']:.2f}%")
        elif result.get("test_acc") is not None:
            print(f"final test accuracy {result['test_acc']:.2f}% (test error {result['test_err']:.2f}%) after "
                  f"{result['iteration']} iterations in {result['time_s']:.1f} s")
        print(f"outputs in {result['out_dir']}")   # a stopped run: its log line above says how to continue
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_command("train", main, sys.argv[1:]))
