"""What a run of benchmarks/gpu_session.sh hands back: pack its work folder into at most three files, check that a
folder would come back whole from the GPU machine, and split the packed rows into the per-benchmark files of
benchmarks/results/.

    python -m benchmarks.gpu_outputs pack WORK OUT [--tables]  # OUT/summary.txt, OUT/rows.jsonl, OUT/logs.tar.gz
    python -m benchmarks.gpu_outputs check OUT                 # exit 1 and one line per problem if OUT breaks LIMITS
    python -m benchmarks.gpu_outputs split ROWS DIR            # DIR/<bench>_<device>.jsonl, rows appended

WORK holds what the stages wrote: stages.tsv (one line per stage: name, status, seconds, budget), <stage>.log,
<stage>.jsonl (the stage's rows), any other *.log and *.xml. `pack` writes
- rows.jsonl: every row of every <stage>.jsonl, with a "stage" field naming the stage;
- logs.tar.gz: stages.tsv, every *.log and *.xml, flat;
- summary.txt: the stage table and, with --tables, the sanitizer, numerics, host-path, model-step and conv tables
  from the rows (rendered by benchmarks.report and benchmarks.sanitize_kernels, which import torch: a pack without
  --tables stays fast enough to run after every stage);
each written to a temporary name and renamed, then checks OUT against LIMITS (exit 1 if it breaks them).
`python -m benchmarks.report OUT/rows.jsonl` renders the README tables from the packed rows as they are (rows name
their benchmark in "bench"); `split` files them where `python -m benchmarks.report --write-readme` looks.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

# What the GPU machine returns from $OUT (its device tool's documented limits): at most 8 files of at most 16 MiB,
# 64 MiB in all, no deeper than two folders below OUT, every file and folder named in letters, digits, '.', '_', '-'.
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
MAX_TOTAL_BYTES = 64 * 2**20
MAX_FOLDERS_DEEP = 2
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
PACKED = ("summary.txt", "rows.jsonl", "logs.tar.gz")


def check(out: Path) -> List[str]:
    """Every way in which folder `out` would not come back whole (empty list: it would)."""
    problems, files, total = [], 0, 0
    for folder, dirs, names in os.walk(out):
        dirs.sort()
        for name in dirs + sorted(names):
            path = Path(folder) / name
            rel = path.relative_to(out)
            if not NAME.match(name):
                problems.append(f"{rel}: name has characters other than letters, digits, '.', '_', '-'")
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                problems.append(f"{rel}: not a plain file or folder")
                continue
            if path.is_dir():
                continue
            files += 1
            size = path.stat().st_size
            total += size
            if len(rel.parts) - 1 > MAX_FOLDERS_DEEP:
                problems.append(f"{rel}: more than {MAX_FOLDERS_DEEP} folders deep")
            if size > MAX_FILE_BYTES:
                problems.append(f"{rel}: {size} bytes, over {MAX_FILE_BYTES}")
    if files > MAX_FILES:
        problems.append(f"{files} files, over {MAX_FILES}")
    if total > MAX_TOTAL_BYTES:
        problems.append(f"{total} bytes in all, over {MAX_TOTAL_BYTES}")
    return problems


def _write(path: Path, data: bytes) -> None:
    """Atomically: a unique temporary file beside path, fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_stages(work: Path) -> List[Dict[str, str]]:
    """The lines of WORK/stages.tsv as dicts (name, status, seconds, budget)."""
    path = Path(work) / "stages.tsv"
    if not path.exists():
        return []
    return [dict(zip(("name", "status", "seconds", "budget"), line.split("\t")))
            for line in path.read_text().splitlines() if line.strip()]


def tagged_rows(work: Path) -> List[Dict[str, object]]:
    """Every row of WORK/<stage>.jsonl for the stages of stages.tsv (then any other *.jsonl), tagged with "stage";
    a line that is not JSON (a stage killed mid-write) is skipped."""
    names = [s["name"] for s in read_stages(work)]
    files = [Path(work) / f"{n}.jsonl" for n in names] + sorted(
        p for p in Path(work).glob("*.jsonl") if p.stem not in names)
    rows = []
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(dict(row, stage=path.stem))
    return rows


def _logs_tar(work: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(Path(work).iterdir()):
            if path.is_file() and (path.suffix in (".log", ".xml") or path.name == "stages.tsv"):
                tar.add(path, arcname=path.name)
    return buf.getvalue()


def stage_table(stages: List[Dict[str, str]]) -> str:
    lines = [f"{'stage':10s} {'status':12s} {'seconds':>7s} {'budget':>6s}"]
    lines += [f"{s['name']:10s} {s['status']:12s} {s['seconds']:>7s} {s.get('budget', ''):>6s}" for s in stages]
    return "\n".join(lines)


def _conv_lines(rows: List[Dict[str, object]]) -> List[str]:
    return [f"conv: {r['model']} x{r['x_shape']} w{r['w_shape']} s{r['stride']} {r['provider']:6s} {r['ms']:.4f} ms, "
            f"floor {r['floor_ms']:.4f} ms" for r in rows if r.get("bench") == "conv_shapes" and r.get("status") == "ok"]


def tables(rows: List[Dict[str, object]]) -> str:
    """The sanitizer table, then the numerics, host-path (overhead), model-step and conv tables of the rows."""
    from benchmarks import report, sanitize_kernels
    sanitize = [r for r in rows if r.get("bench") == "sanitize"]
    numerics = [r for r in rows if r.get("bench") == "numerics"]
    failing = [r for r in numerics if not r.get("ok")]
    parts = [sanitize_kernels.table(sanitize) if sanitize else "sanitize: no rows",
             f"numerics: {len(numerics)} rows, {len(failing)} failing" + "".join(
                 f"\n  FAIL {r['net']} {r['backend']} {r['dtype']} chained={r['chained']} {r['layout']}: "
                 f"{r['failures']}" for r in failing),
             report.numerics_table(rows), report.overhead_table(rows) or "host path (overhead): no rows",
             report.models_table(rows) or "model step (models): no rows", "\n".join(_conv_lines(rows))]
    return "\n\n".join(p for p in parts if p)


def pack(work: Path, out: Path, with_tables: bool) -> List[str]:
    """Write OUT's three files from WORK (module docstring); returns check(out)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = tagged_rows(work)
    stages = read_stages(work)
    summary = stage_table(stages)
    total = sum(int(s["seconds"]) for s in stages if s["seconds"].isdigit())
    summary += f"\nstages: {len(stages)}, {total} s in all, {len(rows)} rows"
    if with_tables:
        try:
            summary += "\n\n" + tables(rows)
        except Exception as e:  # the stage table and the rows must come back even if a table cannot render
            summary += f"\n\ntables: not rendered ({type(e).__name__}: {e})"
    _write(out / "rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    _write(out / "logs.tar.gz", _logs_tar(work))
    _write(out / "summary.txt", (summary + "\n").encode())
    return check(out)


def split(rows_file: Path, into: Path) -> List[Path]:
    """Append the rows of a packed rows.jsonl to INTO/<bench>_<device slug>.jsonl (the names `report` reads);
    returns the files written."""
    groups: Dict[Path, List[str]] = defaultdict(list)
    for line in Path(rows_file).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        slug = "".join(c if c.isalnum() else "-" for c in str(row.get("device", "unknown")).lower()).strip("-")
        groups[Path(into) / f"{row.get('bench', 'unknown')}_{slug}.jsonl"].append(line + "\n")
    for path, lines in groups.items():
        old = path.read_text() if path.exists() else ""
        _write(path, (old + "".join(lines)).encode())
    return sorted(groups)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_outputs", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="pack WORK into OUT, then check OUT")
    a.add_argument("work", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--tables", action="store_true", help="render the tables into summary.txt (imports torch)")
    a = sub.add_parser("check", help="check OUT against the return limits")
    a.add_argument("out", type=Path)
    a = sub.add_parser("split", help="append packed rows to per-benchmark files")
    a.add_argument("rows", type=Path)
    a.add_argument("into", type=Path)
    args = p.parse_args(argv)
    if args.command == "split":
        if not args.rows.is_file():
            p.error(f"rows: {args.rows} is not a file")
        for path in split(args.rows, args.into):
            print(path)
        return 0
    if args.command == "pack":
        if not args.work.is_dir():
            p.error(f"work: {args.work} is not a folder")
        problems = pack(args.work, args.out, args.tables)
    else:
        if not args.out.is_dir():
            p.error(f"out: {args.out} is not a folder")
        problems = check(args.out)
    for line in problems:
        print(f"{args.out}: would not come back whole: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
