"""Kernels per BN-ReLU-conv layer per training step (forward + backward, optimizer excluded) of the Triton backends,
counted on CPU under the Triton interpreter.

    TRITON_INTERPRET=1 python -m benchmarks.bench_kernel_count --out benchmarks/results/kernel_count_cpu.jsonl
    TRITON_INTERPRET=1 python -m benchmarks.bench_kernel_count --ci --out benchmarks/results/kernel_count_cpu.jsonl

The count rule is `bench_overhead`'s CPU rule (`bench_overhead.cpu_kernels` over the profiler's op tree): each Triton
launch counts once, at the launch (the interpreter's grid executor is wrapped, so the ATen ops it runs on its own
copies of the arguments are not counted); each ATen op of the Python composition that computes data — what would be
a kernel on a GPU — counts once, and nothing below it; views, metadata changes and allocations count nothing.

One step here is `cross_entropy(model(x), y).backward()` on a fixed random batch (`--batch`, `--image-size`,
channels_last, fp32), after one warm-up step (plans and caches are built on the first call). Per model and backend a
row with the step's kernels (`kernels`, of which `triton_launches`), `layers` (the BN-ReLU-conv layers of the net,
`bench_overhead.bn_relu_conv_layers`) and the kernels by op; per pair of depths of one family (`--pairs`) a row with
the marginal count per layer: (kernels(deep) − kernels(shallow)) / (layers(deep) − layers(shallow)) — what one more
BN-ReLU-conv layer costs, the stem, the head, the loss and the stage transitions cancelling out (both nets have the
same stages; the added units are all alike).

`GATE` holds the committed marginal counts of `triton_conv` and of `triton` (tier A, with its grid-barrier launches:
FASTRESNET_GRID_BARRIER on) for the CI pair; tests/test_kernel_count.py fails if a change raises either.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402

from benchmarks.bench_overhead import TRITON_PREFIX, bn_relu_conv_layers, count_triton_launches, cpu_kernels  # noqa
from fastresnet.convert import unconvert  # noqa: E402
from fastresnet.models.registry import create_model, default_num_classes  # noqa: E402
from fastresnet.models.resnet import cifar_resnet  # noqa: E402

BACKENDS = ("triton_conv", "triton")
# basic units: preact_resnet20 → 32 adds two units to each stage, so its marginal count is that of 20 → 110 (which adds
# 15 to each); bottleneck units: the family of preact_resnet164 / 1001 with one and two units per stage
PAIRS = (("preact_resnet20", "preact_resnet32"), ("cifar_bottleneck:11", "cifar_bottleneck:20"))
BATCH, IMAGE_SIZE = 4, 8
# the pair and size tests/test_kernel_count.py counts (the cheapest that has every stage: 1, 2 units per stage), and
# the committed marginal kernels per BN-ReLU-conv layer of each backend there; a change that raises one fails the test
CI_PAIR, CI_BATCH, CI_IMAGE_SIZE = ("cifar_basic:8", "cifar_basic:14"), 2, 4
GATE = {"triton_conv": 4.0, "triton": 5.5}
_SPEC = re.compile(r"^cifar_(basic|bottleneck):(\d+)$")


def build(name: str, backend: Optional[str]) -> torch.nn.Module:
    """Seed-0 model `name` on CPU, channels_last: a registry name, or "cifar_<basic|bottleneck>:<depth>" for a CIFAR
    full pre-activation net of any depth (`models.resnet.cifar_resnet`: the family of preact_resnet20/110 and
    164/1001, with fewer units per stage). backend None: the eager twin (BatchNorm2d / ReLU / Conv2d)."""
    torch.manual_seed(0)
    kw = {} if backend is None else {"backend": backend}
    spec = _SPEC.match(name)
    model = cifar_resnet(spec[1], int(spec[2]), **kw) if spec else create_model(name, **kw)
    if backend is None:
        model = unconvert(model, inplace=True)
    return model.to(memory_format=torch.channels_last)


def count_step(model_name: str, backend: str, batch: int = BATCH, image_size: int = IMAGE_SIZE) -> Dict[str, object]:
    """One forward + backward of `model_name` on `backend` (after a warm-up step), counted by the module docstring's
    rule: {"kernels", "triton_launches", "aten_kernels", "layers", "by_op"}."""
    model = build(model_name, backend)
    layers = bn_relu_conv_layers(build(model_name, None), image_size)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(10 if _SPEC.match(model_name) else default_num_classes(model_name), (batch,))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    step()
    with count_triton_launches() as launches, torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    cpu = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    tally = cpu_kernels([e for e in cpu if e.cpu_parent is None])
    triton = sum(n for name, n in tally.items() if name.startswith(TRITON_PREFIX))
    if launches is not None and launches[0] != triton:
        raise RuntimeError(f"{launches[0]} Triton launches, {triton} of them seen as profiler ranges")
    total = sum(tally.values())
    return dict(kernels=total, triton_launches=triton, aten_kernels=total - triton, layers=layers,
                by_op=dict(tally.most_common()))


def marginal(shallow: Dict[str, object], deep: Dict[str, object]) -> Dict[str, object]:
    """Kernels per added BN-ReLU-conv layer between two counts of one family, in all, Triton, ATen and by op."""
    d = deep["layers"] - shallow["layers"]
    if d <= 0:
        raise ValueError(f"expected the deeper net to have more layers, got {shallow['layers']} and {deep['layers']}")
    by_op = Counter(deep["by_op"])
    by_op.subtract(Counter(shallow["by_op"]))
    return dict(kernels_per_layer=(deep["kernels"] - shallow["kernels"]) / d,
                triton_per_layer=(deep["triton_launches"] - shallow["triton_launches"]) / d,
                aten_per_layer=(deep["aten_kernels"] - shallow["aten_kernels"]) / d,
                by_op_per_layer={k: round(v / d, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1]) if v})


def _pair(text: str) -> Tuple[str, str]:
    parts = text.split(",")
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected SHALLOW,DEEP model names, got {text!r}")
    return parts[0], parts[1]


def run(pairs, backends, batch: int, image_size: int, progress=print) -> List[dict]:
    """Rows: one per (model, backend) counted, one per (pair, backend) with the marginal count per layer."""
    rows, counts = [], {}
    for shallow, deep in pairs:
        for backend in backends:
            for name in (shallow, deep):
                if (name, backend) not in counts:
                    t0 = time.time()
                    counts[name, backend] = count_step(name, backend, batch, image_size)
                    c = counts[name, backend]
                    progress(f"{name} {backend}: {c['kernels']} kernels ({c['triton_launches']} Triton) over "
                             f"{c['layers']} layers, {time.time() - t0:.0f} s")
                    rows.append(dict(kind="step", model=name, backend=backend, **c))
            m = marginal(counts[shallow, backend], counts[deep, backend])
            progress(f"{shallow}→{deep} {backend}: {m['kernels_per_layer']:.2f} kernels per layer "
                     f"({m['triton_per_layer']:.2f} Triton, {m['aten_per_layer']:.2f} ATen)")
            rows.append(dict(kind="marginal", model=f"{shallow},{deep}", backend=backend, **m))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench_kernel_count", description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=_pair, nargs="+", default=list(PAIRS),
                   help="SHALLOW,DEEP model pairs of one family (default: %(default)s)")
    p.add_argument("--ci", action="store_true", help=f"the pair and size the test gates: {CI_PAIR} at batch "
                   f"{CI_BATCH}, {CI_IMAGE_SIZE}×{CI_IMAGE_SIZE} (overrides --pairs, --batch, --image-size)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    p.add_argument("--out", type=Path, help="JSONL file: rows of --label are replaced atomically, others kept")
    p.add_argument("--label", default="current", help="the rows' label in --out (e.g. before / after)")
    args = p.parse_args(argv)
    if args.ci:
        args.pairs, args.batch, args.image_size = [CI_PAIR], CI_BATCH, CI_IMAGE_SIZE
    from fastresnet.kernels import interpreting
    if not interpreting():
        p.error("set TRITON_INTERPRET=1: the count runs the Triton kernels on CPU in the interpreter")
    if args.batch < 2 or args.image_size < 1:
        p.error(f"--batch, --image-size: expected a batch of at least 2 (BN in training) and a positive size, got "
                f"{args.batch}, {args.image_size}")
    torch.set_num_threads(1)
    rows = run(args.pairs, args.backends, args.batch, args.image_size)
    if args.out:
        from benchmarks.common import environment
        from benchmarks.static_sm90 import write_atomic
        meta = dict(environment(torch.device("cpu")), bench="kernel_count", label=args.label, batch=args.batch,
                    image_size=args.image_size, dtype="fp32", channels_last=True, interpreter=True)
        write_atomic(args.out, rows, meta)
        print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
