"""Static sm_90 gate: every Triton kernel launch the zoo's nets make, compiled for Hopper without a GPU.

    python benchmarks/static_sm90.py --out benchmarks/results/static_sm90.jsonl   # the whole set, one row a launch
    python benchmarks/static_sm90.py --subset --check                             # CI: a representative subset

What it does, without running anything on a GPU:
1. Traces a forward + backward of each net on the meta device (batch, resolution, dtype and NHWC layout below) and
   records every distinct `fastresnet::` op call with its shapes (no kernel runs: meta tensors carry shapes only).
2. Replays each call through the tier-B backend (`triton_conv`, own conv kernels at every shape) with the tensors
   posing as CUDA tensors (`_PoseAsCuda`), so the host launchers take their GPU branches (tile sizes, tensor-core dot
   dtypes, 132 SMs); `JITFunction.run` is replaced by a recorder that applies Triton's own argument specialisation
   for a CUDA backend (integers equal to 1 or divisible by 16, 16-byte-aligned pointers; torch allocations are) and
   keeps the grid, constexprs and launch options instead of launching. The calls are replayed once more through
   tier A (`triton`) for the kernels only it launches (`PERSISTENT_KERNELS`).
3. Compiles each distinct launch with `triton.compile` for `GPUTarget("cuda", 90, 32)` — what the GPU's JIT would
   build — and reads registers and spills from ptxas's report, shared memory from the compiled metadata,
   tensor-core instructions (`mma` / `wgmma`) from the PTX.

Each row: net, dtype, kernel, shape (the launch's constexprs and sizes), programs (grid size) against 132 SMs,
registers, spill bytes, shared memory, blocks per SM (occupancy limit from registers, shared memory and warps),
longest serial loop (trip count of the kernel's loops for this launch, nested loops multiplied; every loop bound is
a launch argument: a constexpr, or a runtime trip count such as the batch-dependent T, ITERS, ROWS, ROW_BLOCKS), and for CIFAR nets the floor: max(bytes ÷ 4.3 TB/s, FLOPs ÷ peak), bytes counting every tensor argument
once (a lower bound: each byte read or written at least once), FLOPs 2·M·N·K for the conv GEMMs (0 otherwise);
peak 790 TFLOP/s for bf16/fp16 dots, half that for fp32 (TF32, the PyTorch default for convs; its dense tensor-core
rate is half of bf16's on H100/H200).

`--check` fails (exit 1, one line per violation) on: shared memory over 227 KB (232,448 B) per block; any spill in a
CIFAR bf16/fp16 launch (no exceptions: the tier-B conv picks tiles and warps per shape so that none spills,
`kernels.conv.gemm_tiles` / `wgrad_tiles`); a bf16/fp16 dot kernel without `mma`/`wgmma`; a longest loop above
`LOOP_BOUND`; a CIFAR launch (any dtype) with fewer programs than SMs, except the merges of `MERGE_KERNELS` (every
other kernel tiles the M = N·H·W rows and picks its tiles so that it fills the SMs: `kernels.stats.tile_config`,
`kernels.conv.gemm_tiles` / `wgrad_tiles`).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import io
import json
import math
import os
import re
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple
from unittest import mock

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

# ---- the target: H100/H200 SXM (sm_90) -----------------------------------------------------------------------------
SMS = 132
SMEM_PER_BLOCK = 232448        # 227 KB: the opt-in maximum of dynamic shared memory per block
SMEM_PER_SM = 233472           # 228 KB per SM, of which 1 KB is reserved per resident block
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
HBM_BYTES_PER_S = 4.3e12       # measured copy bandwidth of an H200
PEAK_FLOPS = {"bf16": 790e12, "fp16": 790e12, "fp32": 395e12}  # measured bf16 dense; fp32 convs run TF32 (half)

# (row name, batch, resolution): every family the zoo launches. Basic units (preact_resnet56/110: 3×3 convs, the
# 16→32→64 stage transitions with stride-2 3×3 convs and option-A shortcuts), bottlenecks with the stride on the 1×1
# (the default) or on the 3×3 (`stride_on="3x3"`, VARIANTS), and the ImageNet bottleneck net.
NETS = (("preact_resnet56", 128, 32), ("preact_resnet110", 128, 32), ("preact_resnet164", 128, 32),
        ("preact_resnet164_3x3", 128, 32), ("preact_resnet1001", 128, 32), ("preact_resnet50", 64, 224))
# row names that are a zoo model built with keywords: name -> (zoo model, keywords)
VARIANTS = {"preact_resnet164_3x3": ("preact_resnet164", {"stride_on": "3x3"})}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SUBSET = {"nets": ("preact_resnet164",), "dtypes": ("bf16",)}  # CI: CIFAR bf16, where no spill is allowed

# Longest serial loop allowed per program (trip count). The longest today is the conv K loop of ImageNet's 512→512
# 3×3 layers (one loop over 9 taps × 8 channel blocks of 64); wgrad walks at most 64 row blocks per split
# (`kernels.conv._MAX_ROW_BLOCKS`); the merges walk at most ⌈√T⌉ partial rows (`kernels.stats.merge_rows`: 32 at CIFAR
# stage 1 at batch 128, 40 at ImageNet's 56×56 stage at batch 64) where they walked all T (1,024; 1,568).
LOOP_BOUND = 72
_LOOP_CALLS = ("range", "static_range")

# Kernels exempt from the one-program-per-SM rule, and why: they do not tile the M = N·H·W rows but merge per-tile
# partials in a fixed order (deterministic), over a grid of channel (or weight-element) blocks × groups of ⌈√T⌉
# partial rows (`kernels.stats.merge_rows`). They read only the partials (at CIFAR at most 1.1 MB for a statistics
# merge, a floor of 0.25 µs; 9.1 MB for the wgrad split sums, whose grid is 704 programs there); more programs would
# need more merge levels or a merge order that depends on the SM count.
MERGE_KERNELS = {
    "_stats_merge_kernel": "Chan merge of the statistics partials [4, T, C]: channel blocks × row groups",
    "_bn_relu_bwd_merge_kernel": "final sum of the BN-backward partials [2, G, C] and the dx coefficients: one "
                                 "program per channel block",
    "sum_groups_kernel": "ordered sums of partial rows (BN-backward first level, wgrad splits): length blocks × "
                         "row groups × planes",
    "_scale_shift_kernel": "BN's affine map, a [C] vector op: one program per 1,024 channels",
}
# Tier A's kernels with a grid barrier (`kernels.bn_relu.launch_persistent`): at most min(SMs, 64) programs by design
# (all resident at once; each merges all partial rows), each looping over its row tile. Recorded from a replay of the
# calls through tier A, which the tier-B replay does not launch; exempt from the one-program-per-SM rule.
PERSISTENT_KERNELS = {
    "_stats_bn_relu_fwd_kernel": "statistics + BN-ReLU forward: min(SMs, 64) programs, a grid barrier between",
    "_bn_relu_bwd_fused_kernel": "BN backward sums + dx: min(SMs, 64) programs, a grid barrier between",
}


# ---- 1. trace the nets' op calls on the meta device ---------------------------------------------------------------
def _describe(a):
    """A hashable description of an op argument; lists (a unit's weights, saved activations) element by element."""
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), a.dtype, tuple(a.stride()))
    return ("L", tuple(_describe(e) for e in a)) if isinstance(a, list) else ("V", a)


class _RecordOps(TorchDispatchMode):
    """Records every `fastresnet::` op call (op, argument descriptions) in order; other ops go to `other(func, args,
    kwargs, result)` when given (the ops outside the fused ones: the stem, the head, the loss, autograd's sums)."""

    def __init__(self, other=None):
        super().__init__()
        self.calls: List[tuple] = []
        self.other = other

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func).startswith("fastresnet."):
            self.calls.append((func._schema.name, tuple(_describe(a) for a in args)))
        elif self.other is not None:
            self.other(func, args, kwargs or {}, out)
        return out


def meta_model(net: str, dtype: torch.dtype) -> torch.nn.Module:
    """`net` (a zoo model or a name of VARIANTS) on the meta device in dtype, channels_last."""
    from fastresnet.models.registry import create_model
    name, kw = VARIANTS.get(net, (net, {}))
    with torch.device("meta"):
        return create_model(name, **kw).to(dtype).to(memory_format=torch.channels_last)


def meta_input(batch: int, res: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(batch, 3, res, res, device="meta", dtype=dtype).contiguous(memory_format=torch.channels_last)


def trace_calls(net: str, batch: int, res: int, dtype: torch.dtype, inference: bool = True,
                rec: Optional[_RecordOps] = None, train: bool = True) -> List[tuple]:
    """The fastresnet op calls of one training step (forward + backward; unless not `train`) and, with `inference`,
    one inference forward of `net` (a zoo model or a name of VARIANTS) on meta tensors: the distinct ones in order of
    first appearance, or, when `rec` is given, every call (rec.calls; rec.other sees the other ops)."""
    import fastresnet.functional as FF

    model = meta_model(net, dtype)
    x = meta_input(batch, res, dtype)
    mode = rec or _RecordOps()
    # the fused layers resolve their backend from the input's device; meta resolves to the tier-B backend here
    with mock.patch.object(FF, "resolve", lambda t, backend=None: "triton_conv"), mode:
        if train:
            model(x).float().sum().backward()
        if inference:
            model.eval()  # inference launches too (running statistics: convs without the statistics epilogue)
            with torch.no_grad():
                model(x)
    return mode.calls if rec else list(dict.fromkeys(mode.calls))


def _nhwc(shape, dtype, stride):
    # meta convs (the stem) return NCHW strides where cuDNN returns channels_last: every 4-D activation is NHWC
    t = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _materialise(desc):
    kind, *rest = desc
    if kind == "T":
        return _nhwc(*rest)
    return [_materialise(d) for d in rest[0]] if kind == "L" else rest[0]


# ---- 2. replay through the launchers, recording launches ----------------------------------------------------------
def _channels_last(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 4 and not t.is_contiguous() and \
        t.is_contiguous(memory_format=torch.channels_last)


class _PoseAsCuda(TorchFunctionMode):
    """Meta tensors report device cuda:0 and factory calls for cuda make meta tensors: the launchers take their GPU
    branches while nothing is allocated or run. The plain convs inside the unit ops (a shared pre-activation's conv1
    and projection shortcut, forward and backward) return channels_last results for a channels_last input or weight,
    as cuDNN does; their meta kernels return NCHW ones, which would send the next kernels down their NCHW paths."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__:
            return torch.device("cuda", 0)
        if func == torch.Tensor.is_cuda.__get__:
            return True
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cuda":
            kwargs = dict(kwargs, device="meta")
        out = func(*args, **kwargs)
        if func in (torch.nn.functional.conv2d, torch.ops.aten.convolution_backward) and \
                any(_channels_last(a) for a in args[:3]):  # (input, weight) / (grad_output, input, weight)
            with _disable_current_modes():  # a layout the GPU gives directly: no op a dispatch mode should see
                return _to_channels_last(out)
        return out


def _to_channels_last(out):
    """A conv's result(s) (a tensor, or a tuple of tensors and None) with the 4-D ones made channels_last."""
    if isinstance(out, torch.Tensor):
        return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out
    return tuple(None if o is None else _to_channels_last(o) for o in out)


class _Props:
    multi_processor_count = SMS


def _sm90_backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    return make_backend(GPUTarget("cuda", 90, 32))


def _tensor_bytes(args: Iterable) -> int:
    seen = {}
    for a in args:
        if isinstance(a, torch.Tensor):
            seen[id(a)] = a.numel() * a.element_size()
    return sum(seen.values())


def _on_backend(desc, backend: str):
    """An op argument description with the backend name "triton_conv" replaced by `backend`."""
    kind, *rest = desc
    if kind == "L":
        return ("L", tuple(_on_backend(d, backend) for d in rest[0]))
    return ("V", backend) if desc == ("V", "triton_conv") else desc


def record_launches(calls: List[tuple], inner: Optional[TorchDispatchMode] = None,
                    backend_name: str = "triton_conv") -> List[dict]:
    """Every kernel launch the tier-B backend (or `backend_name`'s) makes for the op calls, as the GPU would
    specialise it; `inner`, a dispatch mode, sees the ATen ops the launchers and the ops' Python composition run
    around the launches."""
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from fastresnet.backends import get_backend_impl

    backend = _sm90_backend()
    launches: List[dict] = []
    current: Dict[str, object] = {}

    def record(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        grid = tuple(grid(bound) if callable(grid) else grid) + (1, 1)
        launches.append(dict(fn=self, op=current["op"], signature=signature, constexprs=constexprs, attrs=attrs,
                             options=options, grid=grid[:3], values=dict(bound), bytes=_tensor_bytes(bound.values())))

    ops = _op_functions()
    # "always": the own conv kernels at every shape, every launch the code can make (no timing against cuDNN)
    with mock.patch.object(get_backend_impl("triton_conv"), "select", "always"), \
            mock.patch.object(JITFunction, "run", record), \
            mock.patch.object(torch.cuda, "get_device_properties", lambda *a, **k: _Props()), \
            mock.patch.object(torch.cuda, "current_device", lambda: 0), _PoseAsCuda(), \
            inner or contextlib.nullcontext():
        for name, descs in calls:
            current["op"] = name.split("::")[-1]
            with _disable_current_modes():  # making the arguments is the replay's, not the op's: `inner` sees none
                args = [_materialise(_on_backend(d, backend_name)) for d in descs]
            ops[name](*args)
    return launches


def _op_functions() -> Dict[str, object]:
    """fastresnet op name -> its Python implementation (the function the custom op wraps)."""
    from fastresnet.ops import bn_ops, unit_ops
    return {obj.qualname: obj.body for module in (bn_ops, unit_ops) for obj in vars(module).values()
            if isinstance(obj, bn_ops.FusedOp)}


# ---- launch properties read from the launch itself ----------------------------------------------------------------
def _loop_nests(fn, values: Optional[dict] = None) -> List[List[str]]:
    """The loop bounds of each chain of nested `for` loops a kernel runs, its own and those of the `triton.jit`
    functions it calls (followed through their arguments), each bound a name of the kernel's arguments, "grid<i>"
    (`tl.num_programs(i)`) or an integer literal: [[KH, KW, K_BLOCKS], [GROUPS, ROWS], ["1", "T"], ...]. values: the launch's arguments, to skip the
    kernel's `if FLAG:` blocks whose flag is false in this launch."""
    return _nests(fn, {}, True, [], values or {})


def _nests(fn, names: Dict[str, Optional[str]], top: bool, outer: List[str], values: dict) -> List[List[str]]:
    """`_loop_nests` of jit function fn under the loops `outer`; names: fn's parameters -> the kernel's bound
    (None: an expression that is not one), unused at the top (the kernel's own names)."""
    from triton.runtime.jit import JITFunction

    def token(expr) -> Optional[str]:
        if isinstance(expr, ast.Constant) and isinstance(expr.value, int):
            return str(expr.value)
        if isinstance(expr, ast.Name):
            return expr.id if top else names.get(expr.id)
        if (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "num_programs"
                and len(expr.args) == 1 and isinstance(expr.args[0], ast.Constant)):
            return f"grid{expr.args[0].value}"
        return None

    where = fn.fn.__name__
    nests: List[List[str]] = []

    def walk(node, chain):
        for child in ast.iter_child_nodes(node):
            if (top and isinstance(child, ast.If) and isinstance(child.test, ast.Name)
                    and isinstance(values.get(child.test.id), (bool, int)) and not values[child.test.id]):
                for other in child.orelse:
                    walk(other, chain)
                continue
            if isinstance(child, ast.For) and isinstance(child.iter, ast.Call):
                call = child.iter
                name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
                bound = token(call.args[0]) if name in _LOOP_CALLS and len(call.args) == 1 else None
                if bound is None:
                    raise ValueError(f"{where}: loop bound {ast.unparse(call)} is not a launch argument")
                nests.append(chain + [bound])
                walk(child, chain + [bound])
                continue
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Name):
                callee = fn.fn.__globals__.get(child.func.id)
                if isinstance(callee, JITFunction):
                    params = list(inspect.signature(callee.fn).parameters)
                    mapping = {p: token(a) for p, a in zip(params, child.args)}
                    mapping.update({k.arg: token(k.value) for k in child.keywords})
                    nests.extend(_nests(callee, mapping, False, chain, values))
            walk(child, chain)

    walk(ast.parse(textwrap.dedent(fn.src)), outer)
    return nests


def longest_loop(launch: dict) -> int:
    """Trip count of the kernel's longest nested loop chain for this launch (1 when it has no loop)."""
    values = dict(launch["values"], **{f"grid{i}": g for i, g in enumerate(launch["grid"])})
    trips = [math.prod(int(values[n] if n in values else n) for n in chain)
             for chain in _loop_nests(launch["fn"], values)]
    return max(trips, default=1)


def conv_flops(launch: dict) -> int:
    """2·M·N·K of a conv kernel's GEMM for this launch (the conv's multiply-adds), 0 for the other kernels."""
    v = launch["values"]
    if "C_out" not in v:
        return 0
    if launch["fn"].fn.__name__ == "_conv_dgrad_kernel":  # M rows of one output phase of dx × the taps reaching it
        return 2 * int(v["M"]) * int(v["C_in"]) * int(v["C_out"]) * (int(v["K_ITERS"]) // int(v["K_BLOCKS"]))
    return 2 * int(v["M"]) * int(v["C_in"]) * int(v["C_out"]) * int(v["KH"]) * int(v["KW"])


def _shape(launch: dict) -> dict:
    """The launch's identifying sizes: integer and constexpr arguments (not strides or pointers)."""
    out = {}
    for k, v in launch["values"].items():
        if isinstance(v, torch.Tensor) or (k.startswith("s") and len(k) <= 4 and k[1:2] in "xdwy"):
            continue
        out[k] = str(v) if not isinstance(v, (int, float, bool, str)) else v
    out["num_warps"] = launch["options"].num_warps
    out["num_stages"] = launch["options"].num_stages
    return out


def _compile_key(launch: dict) -> str:
    """What decides the compiled code: the kernel (its source and that of the functions it calls, Triton's
    `cache_key`), the specialised signature, constexprs, options and the compiler version."""
    import triton
    return json.dumps([triton.__version__, launch["fn"].cache_key, launch["fn"].fn.__name__, launch["signature"],
                       {str(k): str(v) for k, v in launch["constexprs"].items()},
                       {str(k): str(v) for k, v in launch["attrs"].items()}, str(launch["options"])], sort_keys=True)


# ---- 3. compile for sm_90 -----------------------------------------------------------------------------------------
_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_sm90(module: str, name: str, signature: dict, constexprs: dict, attrs: dict, options: dict) -> dict:
    """Compile one launch for sm_90 (in a worker process): registers, spills, shared memory, tensor-core ops."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module), name)
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.cache.scope():
        knobs.nvidia.dump_ptxas_log = True                   # ptxas -v's report: registers and spills
        knobs.cache.dir = tempfile.mkdtemp(prefix="static_sm90_")  # a fresh cache: ptxas always runs
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                    target=GPUTarget("cuda", 90, 32), options=options)
    report = log.getvalue()
    regs = [int(r) for r in _PTXAS.findall(report)]
    spills = [(int(s), int(l)) for s, l in _SPILL.findall(report)]
    if not regs or not spills:
        raise RuntimeError(f"{name}: no ptxas resource report in the compile log:\n{report[-2000:]}")
    ptx = kernel.asm["ptx"]
    return dict(registers=max(regs), spill_store_bytes=max(s for s, _ in spills),
                spill_load_bytes=max(l for _, l in spills), shared_bytes=int(kernel.metadata.shared),
                mma=len(re.findall(r"^\s*mma\.", ptx, re.M)), wgmma=len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M)),
                local_ops=len(re.findall(r"\b(?:ld|st)\.local\b", ptx)))


def blocks_per_sm(registers: int, shared: int, num_warps: int) -> Tuple[int, str]:
    """Resident blocks per SM for this launch and the resource that limits it (register allocation is per warp in
    units of 256 registers)."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    limits = {
        "registers": REGS_PER_SM // (regs_per_warp * num_warps),
        "shared": SMEM_PER_SM // (shared + 1024),
        "warps": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
    }
    limit = min(limits, key=limits.get)
    return limits[limit], limit  # 0 blocks: the launch cannot run (over the shared-memory or register file limit)


# ---- rows and the gate --------------------------------------------------------------------------------------------
def _uses_half_dot(row: dict) -> bool:
    return row["shape"].get("DOT_DTYPE") in ("bf16", "fp16")


def violations(row: dict) -> List[str]:
    """What a row breaks of the gate (see module docstring); empty when it passes."""
    where = f"{row['net']} {row['dtype']} {row['kernel']} {row['op']} programs={row['programs']}"
    out = []
    if row["shared_bytes"] > SMEM_PER_BLOCK:
        out.append(f"{where}: shared memory {row['shared_bytes']} B > {SMEM_PER_BLOCK} B per block")
    if row["cifar"] and row["dtype"] in ("bf16", "fp16") and (row["spill_store_bytes"] or row["spill_load_bytes"]):
        out.append(f"{where} {row['shape']}: spills {row['spill_store_bytes']} B stores / "
                   f"{row['spill_load_bytes']} B loads")
    if _uses_half_dot(row) and not (row["mma"] or row["wgmma"]):
        out.append(f"{where}: {row['shape']['DOT_DTYPE']} dot without mma/wgmma in the PTX")
    if row["longest_loop"] > LOOP_BOUND:
        out.append(f"{where}: longest loop {row['longest_loop']} > {LOOP_BOUND}")
    if row["cifar"] and row["programs"] < SMS and row["kernel"] not in MERGE_KERNELS | PERSISTENT_KERNELS.keys():
        out.append(f"{where} {row['shape']}: {row['programs']} programs < {SMS} SMs")
    return out


def _load_cache(path: Optional[Path]) -> Dict[str, dict]:
    if path is None or not path.exists():
        return {}
    with path.open() as f:
        return json.load(f)


def _save_cache(path: Optional[Path], results: Dict[str, dict]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        from fastresnet.checkpoint import write_text
        write_text(str(path), json.dumps(results))


def build_rows(nets, dtypes, jobs: int, cache: Optional[Path] = None, progress=print) -> List[dict]:
    """One row per distinct (net, dtype, kernel launch): traced, recorded, compiled (each launch once; compile
    results are kept in `cache`, keyed by the kernel's source hash, the launch and the triton version)."""
    cifar = {n for n, _, res in NETS if res == 32}
    entries = []
    for net, batch, res in NETS:
        if net not in nets:
            continue
        for dname in dtypes:
            t0 = time.time()
            calls = trace_calls(net, batch, res, DTYPES[dname])
            launches = record_launches(calls) + [la for la in record_launches(calls, backend_name="triton")
                                                 if la["fn"].fn.__name__ in PERSISTENT_KERNELS]
            seen = {}
            for la in launches:
                seen.setdefault((_compile_key(la), la["grid"]), la)
            progress(f"{net} {dname}: {len(launches)} launches, {len(seen)} distinct ({time.time() - t0:.1f} s)")
            entries += [(net, batch, res, dname, net in cifar, la) for la in seen.values()]
    keys = {}
    for *_, la in entries:
        keys.setdefault(_compile_key(la), la)
    results = _load_cache(cache)
    todo = {k: la for k, la in keys.items() if k not in results}
    progress(f"compiling {len(todo)} distinct kernels for sm_90 with {jobs} processes "
             f"({len(keys) - len(todo)} more from the cache {cache})")
    t0 = time.time()
    with ProcessPoolExecutor(jobs) as pool:
        futures = {k: pool.submit(compile_sm90, la["fn"].fn.__module__, la["fn"].fn.__name__, la["signature"],
                                  la["constexprs"], la["attrs"], la["options"].__dict__) for k, la in todo.items()}
        for i, (k, fut) in enumerate(futures.items(), 1):
            results[k] = fut.result()
            if i % 10 == 0 or i == len(futures):
                _save_cache(cache, results)
                progress(f"  {i}/{len(futures)} compiled ({time.time() - t0:.0f} s)")
    rows = []
    for net, batch, res, dname, is_cifar, la in entries:
        res_ = results[_compile_key(la)]
        warps = la["options"].num_warps
        blocks, limit = blocks_per_sm(res_["registers"], res_["shared_bytes"], warps)
        programs = math.prod(la["grid"])
        flops = conv_flops(la)
        row = dict(net=net, batch=batch, resolution=res, dtype=dname, layout="NHWC", cifar=is_cifar, op=la["op"],
                   kernel=la["fn"].fn.__name__, shape=_shape(la), grid=list(la["grid"]), programs=programs,
                   waves=round(programs / (SMS * blocks), 3) if blocks else None, sms_busy=min(programs, SMS), **res_,
                   blocks_per_sm=blocks, occupancy_limit=limit, longest_loop=longest_loop(la),
                   bytes=la["bytes"], flops=flops)
        if is_cifar:
            row["floor_us"] = float(f"{max(la['bytes'] / HBM_BYTES_PER_S, flops / PEAK_FLOPS[dname]) * 1e6:.4g}")
        rows.append(row)
    return rows


def write_atomic(path: Path, rows: List[dict], meta: dict) -> None:
    """Replace path's rows of meta["label"] by rows (rows of other labels are kept: the before/after table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if path.exists():
        with path.open() as f:
            kept = [json.loads(line) for line in f if line.strip()]
        kept = [r for r in kept if r.get("label") != meta["label"]]
    from fastresnet.checkpoint import atomic_write
    with atomic_write(str(path)) as f:
        for row in kept:
            f.write(json.dumps(row) + "\n")
        for row in rows:
            f.write(json.dumps({**meta, **row}) + "\n")


def summary(rows: List[dict]) -> str:
    """The table's headline numbers: launches over the shared-memory limit, spills per CIFAR config, merges' loops,
    CIFAR grids below the SM count."""
    lines = [f"{len(rows)} rows; over the shared-memory limit: "
             f"{sum(r['shared_bytes'] > SMEM_PER_BLOCK for r in rows)}"]
    for net in sorted({r["net"] for r in rows}):
        for d in DTYPES:
            sel = [r for r in rows if r["net"] == net and r["dtype"] == d]
            if sel:
                spill = sorted({(r["kernel"], r["spill_store_bytes"]) for r in sel if r["spill_store_bytes"]})
                lines.append(f"{net} {d}: launches with spills {sum(1 for r in sel if r['spill_store_bytes'])}"
                             f" {spill[:6]}; longest loop {max(r['longest_loop'] for r in sel)}"
                             f"; max shared {max(r['shared_bytes'] for r in sel)} B"
                             f"; max registers {max(r['registers'] for r in sel)}")
    merges = {}
    for r in rows:
        if r["kernel"] in MERGE_KERNELS:
            merges[r["kernel"]] = max(merges.get(r["kernel"], 0), r["longest_loop"])
    lines.append(f"merges' longest loops: {merges}")
    for kernel, why in MERGE_KERNELS.items():
        few = [r["programs"] for r in rows if r["cifar"] and r["kernel"] == kernel and r["programs"] < SMS]
        if few:
            lines.append(f"  {kernel}: {len(few)} CIFAR launches under {SMS} programs (fewest {min(few)}), exempt: "
                         f"{why}")
    small = sorted({(r["kernel"], r["programs"]) for r in rows if r["cifar"] and r["programs"] < SMS
                    and r["kernel"] not in MERGE_KERNELS})
    lines.append(f"CIFAR launches with fewer programs than {SMS} SMs (merges aside): {small}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="static_sm90", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write the rows to this JSONL file (replaced atomically)")
    p.add_argument("--label", default="current", help="the rows' label in --out (e.g. before / after a change); "
                   "rows of other labels in the file are kept")
    p.add_argument("--check", action="store_true", help="exit 1 if any row violates the gate")
    p.add_argument("--subset", action="store_true", help=f"only {SUBSET} (the CI subset)")
    p.add_argument("--cache", type=Path, default=None,
                   help="JSON file of compile results to reuse and extend (e.g. ~/.cache/fastresnet/static_sm90.json);"
                        " none by default: every launch is compiled")
    p.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 8)), help="compile processes")
    args = p.parse_args(argv)
    from fastresnet.kernels import interpreting
    if interpreting():  # the kernels must import as compiled `triton.jit` functions, not interpreted ones
        p.error("TRITON_INTERPRET is set: run the gate without it (it compiles for sm_90 and runs nothing)")
    if args.jobs < 1:
        p.error(f"--jobs: expected a positive integer, got {args.jobs}")
    t0 = time.time()
    nets = SUBSET["nets"] if args.subset else [n for n, _, _ in NETS]
    dtypes = SUBSET["dtypes"] if args.subset else list(DTYPES)
    rows = build_rows(nets, dtypes, args.jobs, args.cache)
    print(summary(rows))
    if args.out:
        from benchmarks.common import environment
        import triton
        meta = dict(environment(torch.device("cpu")), bench="static_sm90", label=args.label, target="sm_90",
                    triton_compiler=triton.__version__, gate_seconds=round(time.time() - t0, 1))
        write_atomic(args.out, rows, meta)
        print(f"wrote {len(rows)} rows to {args.out}")
    bad = [v for r in rows for v in violations(r)]
    for v in bad:
        print(f"VIOLATION {v}")
    print(f"{len(bad)} violations; {time.time() - t0:.0f} s")
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
