"""Triton launches per BN-ReLU-conv layer per training step at GPU batch (forward + backward, optimizer excluded) of
`triton_conv`, counted from the static sm_90 gate's launch recorder.

    python -m benchmarks.kernel_count_sm90 --out benchmarks/results/kernel_count_sm90.jsonl [--label after]

Run without TRITON_INTERPRET: the launchers take their GPU branches (`benchmarks/static_sm90.py`: meta tensors posing
as cuda:0 with 132 SMs, Triton's CUDA argument specialisation), so tile sizes, row tiles, wgrad splits and the merges
are those of an H100/H200 at this batch; nothing is compiled or run. One step is the fused ops' calls of
`model(x).float().sum().backward()` (`static_sm90.trace_calls`, every call), replayed through the tier-B launchers
(`static_sm90.record_launches`); each Triton launch counts once. Per pair of depths of one family (`--pairs`), as in
`benchmarks/bench_kernel_count.py`: (launches(deep) − launches(shallow)) / (layers(deep) − layers(shallow)), the
launches one more BN-ReLU-conv layer adds. The ATen ops around the launches (the stem, the head) are not counted;
tier A cannot be recorded (the recorder replays the tier-B backend's ops).

The recorder replays the registered ops (the path torch.compile and dispatch modes take): their unit backward
(`fastresnet::preact_unit_backward`) receives each BN's statistics, not the forward's scale and shift, and forms the
affine map again (`_scale_shift_kernel`, one per BN), where the eager autograd node reuses the forward's
(`ops.unit_ops`). `eager_per_layer` leaves those launches out: the count of the eager training step, the one
`benchmarks/bench_kernel_count.py` counts on CPU; `triton_per_layer` is the registered ops' count.

`GATE`: the most Triton launches per layer of the eager step `triton_conv` may take at `CI_PAIR`, batch 128, 32×32,
fp32; tests/test_kernel_count.py fails above it.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from benchmarks import static_sm90 as gate  # noqa: E402
from benchmarks.bench_kernel_count import _pair, build, marginal  # noqa: E402
from benchmarks.bench_overhead import bn_relu_conv_layers  # noqa: E402

PAIRS = (("preact_resnet20", "preact_resnet32"), ("preact_resnet20", "preact_resnet110"))
BATCH, RES = 128, 32
CI_PAIR = ("preact_resnet20", "preact_resnet32")
GATE = {"triton_conv": 4.0}


def count_step(net: str, dtype: str, batch: int = BATCH, res: int = RES) -> Dict[str, object]:
    """The Triton launches of one training step of `net` (a zoo model) at GPU batch, in dtype ("fp32", "bf16",
    "fp16"): {"kernels", "triton_launches" (both: the registered ops' launches), "aten_kernels" (0: not counted),
    "eager_launches" (less the unit backward's affine maps, module docstring), "layers", "by_op"}."""
    rec = gate._RecordOps()
    calls = gate.trace_calls(net, batch, res, gate.DTYPES[dtype], inference=False, rec=rec)
    launches = [(launch["op"], launch["fn"].fn.__name__) for launch in gate.record_launches(calls)]
    by_op = Counter(name for _, name in launches)
    recomputed = launches.count(("preact_unit_backward", "_scale_shift_kernel"))
    return dict(kernels=len(launches), triton_launches=len(launches), aten_kernels=0,
                eager_launches=len(launches) - recomputed, layers=bn_relu_conv_layers(build(net, None), res),
                by_op=dict(by_op.most_common()))


def eager_marginal(shallow: Dict[str, object], deep: Dict[str, object]) -> Dict[str, object]:
    """`bench_kernel_count.marginal` of two `count_step`s, with `eager_per_layer`: the eager step's launches per
    added layer."""
    m = marginal(shallow, deep)
    m["eager_per_layer"] = (deep["eager_launches"] - shallow["eager_launches"]) / (deep["layers"] - shallow["layers"])
    return m


def run(pairs, dtypes, batch: int, res: int, progress=print) -> List[dict]:
    """Rows: one per (model, dtype) counted, one per (pair, dtype) with the marginal launches per layer."""
    rows, counts = [], {}
    for shallow, deep in pairs:
        for dtype in dtypes:
            for name in (shallow, deep):
                if (name, dtype) not in counts:
                    t0 = time.time()
                    counts[name, dtype] = c = count_step(name, dtype, batch, res)
                    progress(f"{name} {dtype}: {c['kernels']} Triton launches over {c['layers']} layers, "
                             f"{time.time() - t0:.0f} s")
                    rows.append(dict(kind="step", model=name, backend="triton_conv", dtype=dtype, **c))
            m = eager_marginal(counts[shallow, dtype], counts[deep, dtype])
            progress(f"{shallow}→{deep} {dtype}: {m['eager_per_layer']:.2f} Triton launches per layer in the eager "
                     f"step, {m['triton_per_layer']:.2f} through the registered ops")
            rows.append(dict(kind="marginal", model=f"{shallow},{deep}", backend="triton_conv", dtype=dtype, **m))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="kernel_count_sm90", description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=_pair, nargs="+", default=list(PAIRS),
                   help="SHALLOW,DEEP zoo model pairs of one family (default: %(default)s)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(gate.DTYPES), default=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--image-size", type=int, default=RES)
    p.add_argument("--out", type=Path, help="JSONL file: rows of --label are replaced atomically, others kept")
    p.add_argument("--label", default="current", help="the rows' label in --out (e.g. before / after)")
    args = p.parse_args(argv)
    from fastresnet.kernels import interpreting
    if interpreting():
        p.error("unset TRITON_INTERPRET: the recorder needs the launchers' GPU branches")
    if args.batch < 2 or args.image_size < 1:
        p.error(f"--batch, --image-size: expected a batch of at least 2 (BN in training) and a positive size, got "
                f"{args.batch}, {args.image_size}")
    rows = run(args.pairs, args.dtypes, args.batch, args.image_size)
    if args.out:
        from benchmarks.common import environment
        meta = dict(environment(torch.device("cpu")), bench="kernel_count_sm90", label=args.label, batch=args.batch,
                    image_size=args.image_size, channels_last=True, recorder="static_sm90", sms=gate.SMS)
        gate.write_atomic(args.out, rows, meta)
        print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
