"""Markdown tables and PNG plots from benchmark rows (the JSON Lines files under benchmarks/results/).

    python -m benchmarks.report                       # print the tables of every results file, write plots
    python -m benchmarks.report FILE ... --write-readme [README.md]

For each (device, bench, cell) the newest row wins, so re-running a benchmark replaces its numbers. Rows from
`--cpu-smoke` runs are left out unless --include-smoke. `--write-readme` replaces the text between the markers
`<!-- perf-table:start -->` and `<!-- perf-table:end -->` (both must be present) with the tables and plot links.
"""
from __future__ import annotations

import argparse
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from benchmarks import common

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
# the fields that name one measurement cell of each bench (the newest row per cell and device wins)
CELL_KEYS = {
    "models": ("model", "provider", "dtype", "batch", "image_size", "channels_last"),
    "memory": ("model", "provider", "dtype", "batch", "image_size"),
    "kernels": ("op", "backend", "dtype", "shape"),
}
Row = Dict[str, object]


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
    """Markdown: peak memory at a fixed batch and the largest batch that fits, against depth, per provider."""
    parts = []
    for device, rs in _by_device(rows, "memory").items():
        ok = sorted((r for r in rs if r["status"] == "ok"), key=lambda r: (r["dtype"], r["depth"], r["provider"]))
        body = [[r["model"], r["depth"], r["dtype"], f"`{r['provider']}`", r["batch"], _gib(r["peak_mem_bytes"]),
                 _num(r.get("memory_vs_eager"), ".2f"), _num(r.get("max_batch"), "d")] for r in ok]
        parts += ["Memory against depth, " + _header(rs[0]), ""]
        parts += _table(["model", "depth", "dtype", "provider", "batch", "peak GiB", "mem× eager", "max batch"], body)
        notes = sorted({r["max_batch_note"] for r in ok if r.get("max_batch_note")})
        parts += ["", *notes] if notes else []
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
    ok = [r for r in rows if r["status"] == "ok"]
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
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def render(rows: List[Row], plots: Sequence[Path] = (), relative_to: Optional[Path] = None) -> str:
    """All tables (models, memory, kernels) and links to the plots, as one markdown block."""
    text = "\n".join(t for t in (models_table(rows), memory_table(rows), kernels_table(rows)) if t)
    links = [f"![{p.stem}]({os.path.relpath(p, relative_to) if relative_to else p})" for p in plots]
    return text + ("\n" + "\n".join(links) + "\n" if links else "")


def write_readme(readme: Path, block: str) -> None:
    """Replace the text between the perf-table markers of readme with block."""
    text = readme.read_text()
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"--write-readme: {readme} needs the markers {START} and {END}, in that order")
    readme.write_text(text[: i + len(START)] + "\n" + block.strip() + "\n" + text[j:])


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path, help="JSON Lines files (default: benchmarks/results/"
                   "{models,memory,kernels}_*.jsonl)")
    p.add_argument("--include-smoke", action="store_true", help="keep rows of --cpu-smoke runs")
    p.add_argument("--plots-dir", type=Path, default=common.RESULTS_DIR / "plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--write-readme", type=Path, nargs="?", const=common.REPO_ROOT / "README.md", default=None,
                   metavar="README", help="rewrite the perf-table block of this README (default: the repo's)")
    args = p.parse_args(argv)
    files = args.files or sorted(f for bench in CELL_KEYS for f in common.RESULTS_DIR.glob(f"{bench}_*.jsonl"))
    for f in files:
        if not f.is_file():
            raise SystemExit(f"files: {f} does not exist")
    rows = latest(common.read_rows(files), args.include_smoke)
    if not rows:
        print(f"no rows in {[str(f) for f in files]}" + ("" if args.include_smoke else " (smoke rows left out)"))
        return ""
    plots = []
    if not args.no_plots:
        try:
            plots = plot(rows, args.plots_dir)
        except ImportError as e:  # e.g. the GPU machine, which has no package registry: tables still render
            print(f"no plots: {e} (install matplotlib, or pass --no-plots)")
    base = args.write_readme.resolve().parent if args.write_readme else None
    block = render(rows, [q.resolve() for q in plots] if base else plots, base)
    print(block)
    if args.write_readme:
        write_readme(args.write_readme, block)
        print(f"wrote the perf-table block of {args.write_readme}")
    return block


if __name__ == "__main__":
    main()
