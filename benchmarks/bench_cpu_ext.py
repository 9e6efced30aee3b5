"""CPU benchmark of the C++ kernels of fastresnet._C: one preact_resnet110 training step (forward, backward, SGD),
backend="cuda" (the C++ CPU kernels behind the "cuda" backend) vs backend="torch" (the reference ops), same process,
same weights and data, alternating runs. Writes one JSON row per run to benchmarks/results/bench_cpu_ext.jsonl.

    python benchmarks/bench_cpu_ext.py --batch 8 --steps 5
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import subprocess
import time

import torch

import fastresnet

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "bench_cpu_ext.jsonl"


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=RESULTS.parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _step_fn(backend: str, model_name: str, batch: int, channels_last: bool, state):
    torch.manual_seed(0)
    model = fastresnet.create_model(model_name, backend=backend)
    model.load_state_dict(state)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    target = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="preact_resnet110")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per backend (after 1 warm-up step)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()

    reason = fastresnet.available_backends()["cuda"]
    if reason != "ok":
        raise SystemExit(f"backend 'cuda' unavailable: {reason}")
    state = fastresnet.create_model(args.model).state_dict()
    steps = {b: _step_fn(b, args.model, args.batch, args.channels_last, state) for b in ("cuda", "torch")}
    times = {b: [] for b in steps}
    for b, step in steps.items():  # warm-up
        step()
    for _ in range(args.steps):  # alternate, so load from other processes hits both backends alike
        for b, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[b].append(time.perf_counter() - t0)
    med = {b: statistics.median(t) * 1e3 for b, t in times.items()}
    row = {
        "benchmark": "bench_cpu_ext", "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "model": args.model, "batch": args.batch, "image": 32,
        "channels_last": args.channels_last, "steps": args.steps,
        "ms_per_step_cuda_backend": round(med["cuda"], 2), "ms_per_step_torch_backend": round(med["torch"], 2),
        "speedup_cuda_over_torch": round(med["torch"] / med["cuda"], 3),
        "images_per_s_cuda_backend": round(args.batch / med["cuda"] * 1e3, 2),
        "images_per_s_torch_backend": round(args.batch / med["torch"] * 1e3, 2),
        "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_rev": _git_rev(),
    }
    print(json.dumps(row))
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
