"""Markdown tables and PNG plots from benchmark rows (JSON Lines files).

    python -m benchmarks.report                       # the committed rows and your runs: tables, plots
    python -m benchmarks.report FILE ... --include-smoke
    python -m benchmarks.report --write-docs          # regenerate docs/benchmarks.md and the README's headline

Default files: the committed rows in benchmarks/results/ and your runs in $FASTRESNET_BENCH_DIR or
./benchmark-results/ (`common.output_dir()`). For each (device, bench, cell) the newest row wins, so re-running a
benchmark replaces its numbers. Rows from `--cpu-smoke` runs (tiny harness checks) are left out unless
--include-smoke, and the report says how many it left out.

`--write-docs` (alias `--write-readme`) reads the committed rows only and replaces the text between each pair of
markers `<!-- NAME:start -->` / `<!-- NAME:end -->` of `BLOCKS` with what `generated_blocks` makes: in README.md the
headline table, in docs/benchmarks.md every table and the plot links. tests/test_docs.py checks that the committed
files hold exactly that text.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from benchmarks import common
from fastresnet.checkpoint import save_png, write_text

# the generated blocks: (file relative to the repository root, marker name) -> the function of the rows that makes
# its text, from every row read (`latest` picks the newest per cell). The committed kernel rows are all from a
# --cpu-smoke run, so that block shows smoke rows and says so.
BLOCKS = {
    ("README.md", "headline-table"): lambda rows: headline_table(latest(rows)),
    ("docs/benchmarks.md", "perf-table"): lambda rows: render(latest(rows)),
    ("docs/benchmarks.md", "overhead-table"): lambda rows: overhead_table(latest(rows)),
    ("docs/benchmarks.md", "kernels-table"): lambda rows: smoke_kernels_table(rows),
    ("docs/benchmarks.md", "numerics-table"): lambda rows: numerics_table(latest(rows)),
    ("docs/benchmarks.md", "step-bytes-table"): lambda rows: step_bytes_table(latest(rows)),
    ("docs/benchmarks.md", "plots"): lambda rows: plot_links(),
}
# the headline: one net's training step, GPU rows when there are any, else CPU rows
HEADLINE_MODEL = "preact_resnet110"
# the fields that name one measurement cell of each bench (the newest row per cell and device wins)
CELL_KEYS = {
    "models": ("model", "provider", "dtype", "batch", "image_size", "channels_last"),
    "memory": ("model", "provider", "dtype", "batch", "image_size"),
    "kernels": ("op", "backend", "dtype", "shape"),
    "numerics": ("net", "backend", "dtype", "chained", "layout"),
    "overhead": ("model", "provider", "dtype", "batch", "image_size", "threads"),
    "step_bytes": ("net", "path", "dtype", "batch", "resolution", "target"),
}
Row = Dict[str, object]


def count_smoke(rows: Iterable[Row]) -> int:
    """How many rows of the benches in CELL_KEYS come from --cpu-smoke runs."""
    return sum(1 for r in rows if r.get("bench") in CELL_KEYS and r.get("smoke"))


def latest(rows: Iterable[Row], include_smoke: bool = False) -> List[Row]:
    """One row per (device, bench, cell): the newest by date (ties: the later in input order). Rows of other
    benchmarks (no "bench" field naming one of CELL_KEYS) are left out."""
    best: Dict[tuple, Row] = {}
    for r in rows:
        bench = r.get("bench")
        if bench not in CELL_KEYS or (r.get("smoke") and not include_smoke):
            continue
        key = (r["device"], bench) + tuple(str(r.get(k)) for k in CELL_KEYS[bench])
        if key not in best or str(r["date"]) >= str(best[key]["date"]):
            best[key] = r
    return list(best.values())


def _num(v: Optional[float], fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _gib(v: Optional[float]) -> str:
    return "–" if v is None else f"{v / 2**30:.2f}"


def _header(r: Row) -> str:
    rev = str(r.get("git_rev", "unknown"))[:10]
    return (f"**{r['device']}** — torch {r['torch']}, CUDA {r.get('cuda') or '–'}, "
            f"cuDNN {r.get('cudnn') or '–'}, "
            f"triton {r.get('triton') or '–'}, rev {rev}, {str(r['date'])[:10]}")


def _table(head: Sequence[str], body: List[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + [
        "| " + " | ".join(str(c) for c in line) + " |" for line in body]


def _not_measured(rows: List[Row], what: str) -> List[str]:
    """One bullet per (provider/backend, status, reason): the cells that did not produce numbers, and why."""
    groups: Dict[tuple, List[str]] = defaultdict(list)
    for r in rows:
        if r["status"] != "ok":
            groups[(r.get(what), r["status"], r.get("reason"))].append(str(r.get("model") or r.get("op")))
    return [f"- `{name}` {status} ({', '.join(sorted(set(cells)))}): {reason}"
            for (name, status, reason), cells in sorted(groups.items(), key=lambda kv: str(kv[0]))]


def _by_device(rows: List[Row], bench: str) -> Dict[str, List[Row]]:
    out: Dict[str, List[Row]] = defaultdict(list)
    for r in rows:
        if r["bench"] == bench:
            out[r["device"]].append(r)
    return out


def models_table(rows: List[Row]) -> str:
    """Markdown: ms/step, images/s, peak memory, TFLOP/s and ratios to eager per model, dtype and provider."""
    parts = []
    for device, rs in _by_device(rows, "models").items():
        ok = [r for r in rs if r["status"] == "ok"]
        body = [[r["model"], f"{r['batch']}×{r['image_size']}²", "NHWC" if r.get("channels_last") else "NCHW",
                 r["dtype"], f"`{r['provider']}`",
                 _num(r["ms_per_step"], ".2f"), _num(r["images_per_s"], ",.0f"), _gib(r["peak_mem_bytes"]),
                 _num(r.get("tflops"), ".3g"), _num(r.get("speedup_vs_eager"), ".2f"),
                 _num(r.get("memory_vs_eager"), ".2f")] for r in ok]
        parts += ["Training step (forward + backward + SGD), " + _header(rs[0]), ""]
        parts += _table(["model", "batch×input", "layout", "dtype", "provider", "ms/step", "images/s", "peak GiB",
                         "TFLOP/s", "speed× eager", "mem× eager"], body)
        if device == "cpu":
            parts += ["", "CPU: peak memory is not measured (no allocator statistic) and shown as –."]
        missing = _not_measured(rs, "provider")
        parts += (["", "Not measured:"] + missing) if missing else []
        parts.append("")
    return "\n".join(parts)


def memory_table(rows: List[Row]) -> str:
    """Markdown, against depth, per provider: bytes saved for backward (exact) and their ratio to eager, the step
    time against the fused default ("none"), peak memory (GPU: max_memory_allocated; CPU rows have none, their RSS
    growth stays in the rows: malloc keeps freed memory, so it ranks modes poorly) and the largest batch."""
    parts = []
    for device, rs in _by_device(rows, "memory").items():
        ok = sorted((r for r in rs if r["status"] == "ok"), key=lambda r: (r["dtype"], r["depth"], r["provider"]))
        body = [[r["model"], r["depth"], r["dtype"], f"`{r['provider']}`", r["batch"],
                 _num(r.get("saved_bytes") and r["saved_bytes"] / 2**20, ".1f"), _num(r.get("saved_vs_eager"), ".3f"),
                 _num(r.get("step_time_vs_none"), ".2f"), _gib(r["peak_mem_bytes"]),
                 _num(r.get("memory_vs_eager") if r["peak_mem_bytes"] else None, ".2f"),
                 _num(r.get("max_batch"), "d")] for r in ok]
        parts += ["Memory against depth, " + _header(rs[0]), ""]
        parts += _table(["model", "depth", "dtype", "provider", "batch", "saved MiB", "saved× eager",
                         "time× none", "peak GiB", "peak× eager", "max batch"], body)
        notes = sorted({r["max_batch_note"] for r in ok if r.get("max_batch_note")})
        parts += ["", *notes] if notes else []
        missing = _not_measured(rs, "provider")
        parts += (["", "Not measured:"] + missing) if missing else []
        parts.append("")
    return "\n".join(parts)


def overhead_table(rows: List[Row]) -> str:
    """Markdown: the host cost of a training step on tiny tensors per model and provider (median wall ms, its range
    over the rounds, ratio to eager of the same run; the same for the process CPU time, steadier on a shared machine),
    the kernels one step launches (all, optimizer, forward + backward per BN-ReLU-conv layer) and the share of the
    profiled step spent in convolution ops."""
    parts = []
    for device, rs in _by_device(rows, "overhead").items():
        ok = [r for r in rs if r["status"] == "ok"]
        body = [[r["model"], f"{r['batch']}×{r['image_size']}²", r["threads"],
                 f"`{r['provider']}`" + (f" (→ `{r['resolved_backend']}`)" if r.get("resolved_backend") else ""),
                 _num(r["ms_per_step"], ".2f"), f"{r['ms_min']:.2f}–{r['ms_max']:.2f}",
                 _num(r.get("host_cost_vs_eager"), ".2f"), _num(r.get("cpu_ms_per_step"), ".2f"),
                 _num(r.get("cpu_cost_vs_eager"), ".2f"), _num(r.get("kernels_per_step"), "d"),
                 _num(r.get("kernels_optimizer"), "d"), _num(r.get("kernels_per_conv_layer"), ".2f"),
                 _num(r.get("conv_share") and 100 * r["conv_share"], ".0f")] for r in ok]
        layers = sorted({(r["model"], r["bn_relu_conv_layers"]) for r in ok if r.get("bn_relu_conv_layers")})
        parts += [f"Host cost of a training step on tiny tensors (forward + backward + SGD; median of "
                  f"{rs[0]['reps']} interleaved rounds), " + _header(rs[0]), ""]
        parts += _table(["model", "batch×input", "threads", "provider", "ms/step", "min–max", "host× eager",
                         "CPU ms/step", "CPU× eager", "kernels/step", "optimizer kernels",
                         "fwd+bwd kernels / BN-ReLU-conv", "conv % of step"], body)
        parts += ["", "BN-ReLU-conv layers: " + ", ".join(f"{m} {n}" for m, n in layers) + ". "
                  + ("Kernels: CUDA kernel events of the profiler." if device != "cpu" else
                     "Kernels on CPU: the ATen ops that would be GPU kernels (one per op, views and allocations "
                     "left out), extension ops and Triton launches (rule in `benchmarks/bench_overhead.py`). ")
                  + "conv %: self CPU time of the ATen convolution ops in one profiled step."]
        missing = _not_measured(rs, "provider")
        parts += (["", "Not measured:"] + missing) if missing else []
        parts.append("")
    return "\n".join(parts)


def _shape(shape: list) -> str:
    """[N, C, H, W] -> "N×C×H×W"; a conv's [x shape, w shape, stride, padding] ->
    "x N×C×H×W, w O×I×kh×kw, s<stride> p<padding>"."""
    if shape and isinstance(shape[0], list):
        x, w, stride, padding = shape
        return f"x {_shape(x)}, w {_shape(w)}, s{stride} p{padding}"
    return "×".join(str(v) for v in shape)


def kernels_table(rows: List[Row]) -> str:
    """Markdown: per fused op and backend, time, GB/s (or TFLOP/s) and the share of the measured device ceilings."""
    parts = []
    for device, rs in _by_device(rows, "kernels").items():
        ok = [r for r in rs if r["status"] == "ok"]
        body = [[r["op"], f"`{r['backend']}`", r["dtype"], _shape(r["shape"]), _num(r["us"], ".1f"),
                 _num(r.get("gbps"), ".3g"), _num(r.get("pct_of_copy"), ".0f"), _num(r.get("tflops"), ".3g"),
                 _num(r.get("pct_of_matmul"), ".0f"), _num(r.get("speedup_vs_torch"), ".2f")] for r in ok]
        head = rs[0]
        parts += ["Fused kernels, " + _header(head),
                  f"(ceilings measured in the same run: device-to-device copy "
                  f"{_num(head.get('ceiling_copy_gbps'), '.0f')} GB/s, "
                  f"{head.get('ceiling_matmul_dtype', 'bf16')} matmul {_num(head.get('ceiling_matmul_tflops'), '.3g')} "
                  f"TFLOP/s)", ""]
        parts += _table(["op", "backend", "dtype", "shape", "µs", "GB/s", "% copy", "TFLOP/s", "% matmul",
                         "speed× torch"], body)
        missing = _not_measured(rs, "backend")
        parts += (["", "Not measured:"] + missing) if missing else []
        parts.append("")
    return "\n".join(parts)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-")


def plot(rows: List[Row], out_dir: Path) -> List[Path]:
    """PNG plots: speedup vs eager per model (one per device and dtype) and peak memory / max batch against depth
    (one per device and dtype, GPU rows only: CPU rows carry no memory numbers). Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    ok = [r for r in rows if r.get("status") == "ok"]  # numerics rows carry a verdict, not a status
    groups: Dict[tuple, List[Row]] = defaultdict(list)
    for r in ok:
        groups[(r["bench"], r["device"], r["dtype"])].append(r)
    for (bench, device, dtype), rs in sorted(groups.items()):
        if bench == "models":
            models = sorted({r["model"] for r in rs})
            providers = [p for p in dict.fromkeys(r["provider"] for r in rs)]
            fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(models) + 2), 4))
            width = 0.8 / max(len(providers), 1)
            for i, p in enumerate(providers):
                vals = {r["model"]: r.get("speedup_vs_eager") for r in rs if r["provider"] == p}
                ax.bar([j + i * width for j in range(len(models))], [vals.get(m) or 0 for m in models], width,
                       label=p)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, rotation=15)
            ax.set_ylabel("training-step speedup vs eager")
            ax.set_title(f"{device}, {dtype}")
            ax.legend(fontsize=7, ncol=2)
        elif bench == "memory" and any(r["peak_mem_bytes"] for r in rs):
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
            for p in dict.fromkeys(r["provider"] for r in rs):
                pts = sorted((r["depth"], r["peak_mem_bytes"], r.get("max_batch")) for r in rs if r["provider"] == p)
                a1.plot([d for d, m, _ in pts if m], [m / 2**30 for d, m, _ in pts if m], "o-", label=p)
                a2.plot([d for d, _, b in pts if b], [b for d, _, b in pts if b], "o-", label=p)
            a1.set_xlabel("depth")
            a1.set_ylabel(f"peak GiB at batch {rs[0]['batch']}")
            a2.set_xlabel("depth")
            a2.set_ylabel("largest batch that fits")
            a1.legend(fontsize=7)
            fig.suptitle(f"{device}, {dtype}")
        else:
            continue
        fig.tight_layout()
        path = out_dir / f"{bench}_{_slug(device)}_{dtype}.png"
        save_png(fig, str(path), dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def numerics_table(rows: List[Row]) -> str:
    """The whole-net numerics judge (`fastresnet numerics` rows), per device: each net and backend's global gradient
    error against float64 beside plain PyTorch's (the "torch" backend) in the same configuration, channels_last,
    chained, per dtype; the verdict over every configuration of that net and backend."""
    out = []
    dtypes = ("float32", "float16", "bfloat16")
    for device, rs in _by_device(rows, "numerics").items():
        cells = {(r["net"], r["backend"], r["dtype"]): r for r in rs if r["chained"] and r["layout"] == "nhwc"}
        body = []
        for net, backend in sorted({(r["net"], r["backend"]) for r in rs if r["backend"] != "torch"}):
            verdicts = [r["ok"] for r in rs if r["net"] == net and r["backend"] == backend]
            body.append([net, f"`{backend}`"] + [
                f"{cells[(net, backend, d)]['errors']['grad']:.2e} ({cells[(net, backend, d)]['baseline']['grad']:.2e})"
                if (net, backend, d) in cells else "–" for d in dtypes]
                + [f"{sum(verdicts)} / {len(verdicts)} pass"])
        out += [f"Numerics on {device}: global gradient error, fused (plain PyTorch)", ""]
        out += _table(["net", "backend"] + list(dtypes) + ["all configurations"], body) + [""]
    return "\n".join(out)


def step_bytes_table(rows: List[Row]) -> str:
    """The bytes one training step moves and its floor time at the copy bandwidth, fused (`triton_conv`'s sm_90
    launches) next to eager PyTorch, per net (`benchmarks/step_bytes.py` rows: computed, not measured)."""
    rs = [r for r in rows if r["bench"] == "step_bytes"]
    if not rs:
        return ""
    cells = {(r["net"], r["path"]): r for r in rs}
    body = []
    for net in sorted({r["net"] for r in rs}, key=lambda n: (len(n), n)):
        fused, eager = cells.get((net, "fused")), cells.get((net, "eager"))
        if not (fused and eager):
            continue
        body.append([net, f"{fused['batch']}×{fused['resolution']}²", fused["dtype"],
                     f"{fused['bytes'] / 1e9:.2f}", f"{fused['floor_ms']:.2f}",
                     f"{fused['triton_launches']} + {fused['aten_kernels']}",
                     f"{eager['bytes'] / 1e9:.2f}", f"{eager['floor_ms']:.2f}", eager["aten_kernels"],
                     f"{eager['bytes'] / fused['bytes']:.2f}"])
    head = rs[0]
    return "\n".join([f"One training step's memory traffic (forward + backward, optimizer excluded) and its floor at "
                      f"{head['hbm_bytes_per_s'] / 1e12:.1f} TB/s, {head['target']} launches computed on "
                      f"{head['device']} (torch {head['torch']}, triton {head.get('triton')}, rev "
                      f"{str(head.get('git_rev'))[:10]}, {str(head['date'])[:10]})", ""]
                     + _table(["net", "batch×input", "dtype", "fused GB", "fused floor ms",
                               "fused kernels (Triton + ATen)", "eager GB", "eager floor ms", "eager kernels",
                               "eager÷fused bytes"], body))


def render(rows: List[Row], plots: Sequence[Path] = ()) -> str:
    """The training-step and memory tables and links to the plots, as one markdown block."""
    text = "\n".join(t for t in (models_table(rows), memory_table(rows)) if t)
    links = [f"![{p.stem}]({p})" for p in plots]
    return text + ("\n" + "\n".join(links) + "\n" if links else "")


def headline_table(rows: List[Row]) -> str:
    """The README's results table: HEADLINE_MODEL's training step per provider, with its conditions (device,
    versions, revision, date). GPU rows replace the CPU rows as soon as there are any."""
    models = [r for r in rows if r["bench"] == "models" and r["model"] == HEADLINE_MODEL and r["status"] == "ok"]
    gpu = [r for r in models if r["device"] != "cpu"]
    chosen = gpu or models
    if not chosen:
        return ""
    body = [[r["device"], f"{r['batch']}×{r['image_size']}²", "NHWC" if r.get("channels_last") else "NCHW",
             r["dtype"], f"`{r['provider']}`", _num(r["ms_per_step"], ".2f"),
             _num(r.get("speedup_vs_eager"), ".2f")] for r in chosen]
    return "\n".join([f"{HEADLINE_MODEL} training step (forward + backward + SGD), " + _header(chosen[0]), ""]
                     + _table(["device", "batch×input", "layout", "dtype", "provider", "ms/step", "speed× eager"],
                              body))


def smoke_kernels_table(rows: List[Row]) -> str:
    """The kernel table of every row, --cpu-smoke rows included and counted in a note."""
    smoke = count_smoke(r for r in rows if r.get("bench") == "kernels")
    table = kernels_table(latest(rows, include_smoke=True))
    return table + (f"\n{smoke} of these rows come from a `--cpu-smoke` run (one small shape, few repetitions)."
                    if smoke and table else "")


def plot_links() -> str:
    """Links, relative to docs/, to the committed plots in benchmarks/results/plots/."""
    plots = sorted((common.RESULTS_DIR / "plots").glob("*.png"))
    return "\n".join(f"![{p.stem}]({os.path.relpath(p, common.REPO_ROOT / 'docs')})" for p in plots)


def committed_files() -> List[Path]:
    """The committed rows of every bench of CELL_KEYS (benchmarks/results/), which the generated docs show."""
    return sorted(f for bench in CELL_KEYS for f in common.RESULTS_DIR.glob(f"{bench}_*.jsonl"))


def generated_blocks(rows: List[Row]) -> Dict[tuple, str]:
    """(file, marker name) -> the text `write_docs` puts between that file's markers, for these rows (all rows
    read, before `latest`)."""
    return {key: make(rows).strip() for key, make in BLOCKS.items()}


def replace_block(text: str, name: str, block: str) -> str:
    """text with the part between `<!-- name:start -->` and `<!-- name:end -->` replaced by block."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"needs the markers {start} and {end}, in that order")
    return text[: i + len(start)] + "\n" + block + "\n" + text[j:]


def write_docs(rows: List[Row], root: Path = common.REPO_ROOT) -> List[Path]:
    """Rewrite every generated block of BLOCKS under root from rows; each file is replaced atomically. Returns the
    files written."""
    by_file: Dict[Path, str] = {}
    for (name, marker), block in generated_blocks(rows).items():
        path = root / name
        try:
            by_file[path] = replace_block(by_file.get(path) or path.read_text(), marker, block)
        except ValueError as e:
            raise ValueError(f"write_docs: {path}: {e}") from None
    for path, text in by_file.items():
        write_text(str(path), text)
    return list(by_file)


def default_files() -> List[Path]:
    """The committed rows and the user's runs, for every bench of CELL_KEYS."""
    return sorted(f for folder in (common.RESULTS_DIR, common.output_dir()) for bench in CELL_KEYS
                  for f in folder.glob(f"{bench}_*.jsonl"))


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path, help="JSON Lines files (default: <bench>_*.jsonl for every bench "
                   "of CELL_KEYS, in benchmarks/results/ and in $FASTRESNET_BENCH_DIR or ./benchmark-results/)")
    p.add_argument("--include-smoke", action="store_true", help="keep rows of --cpu-smoke runs")
    p.add_argument("--plots-dir", type=Path, default=None, help="default: plots/ beside your runs "
                   "($FASTRESNET_BENCH_DIR or ./benchmark-results/); with --write-docs benchmarks/results/plots/, "
                   "which docs/benchmarks.md links")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--write-docs", "--write-readme", action="store_true",
                   help="regenerate docs/benchmarks.md and the README's headline table from the committed rows "
                   "(benchmarks/results/; copy your runs' rows there first)")
    args = p.parse_args(argv)
    if args.write_docs and (args.files or args.include_smoke):
        p.error("--write-docs: the docs show the committed rows only (no FILES, no --include-smoke)")
    files = args.files or (committed_files() if args.write_docs else default_files())
    for f in files:
        if not f.is_file():
            p.error(f"files: {f} does not exist")
    all_rows = common.read_rows(files)
    rows = latest(all_rows, args.include_smoke)
    smoke = 0 if args.include_smoke else count_smoke(all_rows)
    if smoke:
        print(f"left out {smoke} rows of --cpu-smoke runs (tiny harness checks); --include-smoke shows them",
              file=sys.stderr)
    if not rows:
        print(f"no rows to report in {[str(f) for f in files]}")
        return ""
    if args.plots_dir is None:
        args.plots_dir = (common.RESULTS_DIR if args.write_docs else common.output_dir()) / "plots"
    plots = []
    if not args.no_plots:
        try:
            plots = plot(rows, args.plots_dir)
        except ImportError as e:  # e.g. the GPU machine, which has no package registry: tables still render
            print(f"no plots: {e} (install matplotlib, or pass --no-plots)")
    text = "\n".join(t for t in (render(rows, plots), kernels_table(rows), numerics_table(rows), overhead_table(rows),
                                  step_bytes_table(rows)) if t)
    print(text)
    if args.write_docs:
        for path in write_docs(all_rows):
            print(f"wrote the generated blocks of {path}")
    return text


if __name__ == "__main__":
    main()
