"""Distinct Triton compilations of a training run, counted from the static sm_90 gate's launch recorder.

    python -m benchmarks.compilations --out benchmarks/results/compilations_sm90.jsonl [--label after]

A training run of preact_resnet164 (fp32, 32×32, channels_last) on CIFAR: training steps at batch 128, the partial
last training batch (50,000 mod 128 = 80), evaluation forwards at batch 256 and the partial last evaluation batch
(10,000 mod 256 = 16). Each phase is recorded as `benchmarks/static_sm90.py` records a net (the tier-B backend's
GPU launches, Triton's argument specialisation for a CUDA backend) and its launches are keyed by what decides the
compiled code (`static_sm90._compile_key`: kernel source, specialised signature, constexprs, options); a phase's
count is the keys no earlier phase made, so the total is the number of kernels the GPU's JIT compiles in the run.
Nothing is compiled or run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from benchmarks import static_sm90 as gate  # noqa: E402

NET, DTYPE, RES = "preact_resnet164", "fp32", 32
# (phase, batch, training step, inference forward), in the order a run meets them
PHASES = (("train", 128, True, False), ("train, last batch", 80, True, False),
          ("eval", 256, False, True), ("eval, last batch", 16, False, True))


def count(net: str = NET, dtype: str = DTYPE, res: int = RES, phases=PHASES, progress=print) -> dict:
    """{"phases": [{phase, batch, launches, new}], "total": distinct compilations of the run}."""
    seen = set()
    out = []
    for phase, batch, train, inference in phases:
        t0 = time.time()
        calls = gate.trace_calls(net, batch, res, gate.DTYPES[dtype], inference=inference, train=train)
        launches = gate.record_launches(calls)
        keys = {gate._compile_key(la) for la in launches}
        out.append(dict(phase=phase, batch=batch, launches=len(launches), distinct=len(keys), new=len(keys - seen)))
        seen |= keys
        progress(f"{net} {dtype} {phase} (batch {batch}): {len(keys)} distinct, {out[-1]['new']} new "
                 f"({time.time() - t0:.1f} s)")
    return dict(phases=out, total=len(seen))


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compilations", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write the row to this JSONL file (rows of other labels are kept)")
    p.add_argument("--label", default="current", help="the row's label (e.g. before / after a change)")
    args = p.parse_args(argv)
    from fastresnet.kernels import interpreting
    if interpreting():
        p.error("TRITON_INTERPRET is set: run without it (it records the GPU's launches and runs nothing)")
    result = count()
    print(f"{result['total']} distinct compilations")
    if args.out:
        from benchmarks.common import environment
        meta = dict(environment(torch.device("cpu")), bench="compilations", label=args.label, target="sm_90")
        gate.write_atomic(args.out, [dict(net=NET, dtype=DTYPE, resolution=RES, **result)], meta)
        print(f"wrote the row to {args.out}")
    return result


if __name__ == "__main__":
    main()
