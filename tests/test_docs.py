"""The README and the generated docs stay true to the committed benchmark rows.

- The README has at most README_MAX_LINES lines.
- Every measured number in the README's prose is a value of a committed row (`benchmarks/results/*.jsonl`). A
  measured number is a decimal with a fractional part followed by a unit (`0.500×`, `12.5 ms`, `3.4 GiB`, ...), or
  any number followed by `%`; integers before `×` are sizes and bars (`8×8`, "within 2× the error"), not
  measurements. Fenced code and the generated blocks are left out (the blocks are checked whole, below). A number is
  backed when some numeric value v of some committed row gives it at the printed precision: round(v, d) for a ratio
  or a time, round(100·v, d) or round(v, d) for a percentage.
- The generated blocks of README.md and docs/benchmarks.md are exactly what `benchmarks/report.py` makes from the
  committed rows (`python -m benchmarks.report --write-docs` rewrites them).
- The quick start's two commands are the README's first code block, unchanged.
"""
import re
from pathlib import Path

import pytest

from benchmarks import common, report

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 180
QUICK_START = [
    'pip install torch==2.13.0 setuptools wheel ninja && pip install --no-build-isolation -e ".[train]" && '
    "python -m fastresnet.train",
    "bash tests/run.sh",
]
UNITS = r"×|%|\s?(?:ms|µs|s|min|GiB|MiB|GB/s|TFLOP/s)\b"
MEASURED = re.compile(rf"(?<![\w.])(\d+(?:,\d{{3}})*\.\d+|\d+(?=%))({UNITS})")
BLOCK = re.compile(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", re.S)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def prose(text: str) -> str:
    """text without fenced code and generated blocks."""
    return FENCE.sub("", BLOCK.sub("", text))


def measured_numbers(text: str):
    """(number as printed, its value, digits after the point, unit) for each measured number of text's prose."""
    for m in MEASURED.finditer(prose(text)):
        printed, unit = m.group(1), m.group(2).strip()
        digits = len(printed.split(".")[1]) if "." in printed else 0
        yield printed, float(printed.replace(",", "")), digits, unit


def _values(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _values(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _values(v)


@pytest.fixture(scope="module")
def rows():
    return common.read_rows(report.committed_files())


def backed(value: float, digits: int, unit: str, row_values) -> bool:
    scales = (1.0, 100.0) if unit == "%" else (1.0,)
    return any(round(v * s, digits) == value for v in row_values for s in scales)


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; the limit is {README_MAX_LINES}: move detail into docs/"


def test_readme_numbers_are_backed_by_rows(rows):
    values = set(_values(rows))
    numbers = list(measured_numbers(README.read_text()))
    unbacked = [printed + unit for printed, value, digits, unit in numbers if not backed(value, digits, unit, values)]
    assert not unbacked, f"README.md states numbers no committed row in benchmarks/results/ gives: {unbacked}"


def test_measured_numbers_rule():
    text = "eager 0.500× and 1,234.5 ms, 99% of 8×8 inputs within 2× the error\n```\n0.123×\n```\n"
    assert [(p, u) for p, _, _, u in measured_numbers(text)] == [("0.500", "×"), ("1,234.5", "ms"), ("99", "%")]
    assert backed(0.5, 3, "×", [0.50031]) and not backed(0.5, 3, "×", [0.5006])
    assert backed(99.0, 0, "%", [0.9944]) and not backed(98.0, 0, "%", [0.9944])


def test_generated_blocks_match_committed_rows(rows):
    stale = []
    for (name, marker), block in report.generated_blocks(rows).items():
        text = (ROOT / name).read_text()
        expected = report.replace_block(text, marker, block)
        if expected != text:
            stale.append(f"{name}: {marker}")
    assert not stale, f"generated blocks out of date: {stale}; run `python -m benchmarks.report --write-docs`"


def test_readme_quick_start_is_the_two_commands():
    first = FENCE.search(README.read_text()).group(0)
    commands = [line for line in first.splitlines()[1:-1] if line and not line.startswith("#")]
    assert commands == QUICK_START


def test_write_docs_fills_every_block(rows, tmp_path):
    (tmp_path / "docs").mkdir()
    for name in {name for name, _ in report.BLOCKS}:
        markers = [m for n, m in report.BLOCKS if n == name]
        (tmp_path / name).write_text("head\n" + "".join(f"<!-- {m}:start -->\nold\n<!-- {m}:end -->\n"
                                                          for m in markers))
    written = report.write_docs(rows, root=tmp_path)
    assert sorted(written) == sorted(tmp_path / name for name in {name for name, _ in report.BLOCKS})
    blocks = report.generated_blocks(rows)
    for (name, marker), block in blocks.items():
        text = (tmp_path / name).read_text()
        assert "old" not in text and f"<!-- {marker}:start -->\n{block}\n<!-- {marker}:end -->" in text
    assert "speed× eager" in blocks[("README.md", "headline-table")]
    (tmp_path / "README.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="headline-table"):
        report.write_docs(rows, root=tmp_path)


@pytest.mark.slow
def test_readme_example_runs(capsys):
    """The README's Python example, as written (a zoo model's training forward and backward, a converted model)."""
    (example,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    exec(compile(example, "README.md example", "exec"), {})
    assert "PreActConv2d" in capsys.readouterr().out
