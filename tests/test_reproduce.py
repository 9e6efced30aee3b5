"""`fastresnet reproduce`: the plan of every experiment, the smoke pipeline of each (runs, rows, report, figures),
kill + resume to the same rows without repeating finished runs, sharding, the dry run, and one-line errors.

Cost: one smoke pass over all six experiments into a shared folder (31 distinct runs, five of them 1001-layer nets
and one 1202-layer net, 2 iterations each at batch 64 on 4×4 synthetic images and an evaluation of one batch), plus
Fig. 6's four runs twice more (killed/resumed and sharded).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastresnet import cli, reproduce, train
from fastresnet.reproduce import EXPERIMENTS, Row, build_plan, main, shard
from threads import one_torch_thread

# what a rerun must reproduce exactly: everything except when, how long and where
STABLE = ("experiment", "group", "row", "seed", "model", "model_kwargs", "dataset", "paper_dataset", "recipe",
          "batch_size", "test_err", "final_train_loss", "iterations", "run_dir")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():   # also keeps results bitwise stable
        yield


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    """Every experiment's smoke reproduction, in one output folder (runs shared between experiments)."""
    out = tmp_path_factory.mktemp("smoke")
    with one_torch_thread():
        for name in EXPERIMENTS:
            assert main([name, "--smoke", "--out", str(out)]) == 0
    return out


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _stable(rows):
    return [{k: r[k] for k in STABLE} for r in rows]


def test_plans_hold_the_papers_rows_and_recipe(tmp_path):
    sizes = {"table1": 12, "table2": 10, "table3": 12, "table4": 9, "fig1": 2, "fig6": 4}
    assert {name: len(e.rows) for name, e in EXPERIMENTS.items()} == sizes
    assert len(EXPERIMENTS["table4"].paper_only) == 14                  # NIN … LSUV, CIFAR-10 and CIFAR-100
    plan = build_plan(EXPERIMENTS["table4"], 5, str(tmp_path), "data", smoke=False)
    assert len(plan) == 9 * 5 and [r.seed for r in plan[:5]] == [0, 1, 2, 3, 4]
    by_label = {r.row.label: r.cfg for r in plan if r.seed == 0}
    paper = by_label["CIFAR-10, ResNet-1001 [ours] (10.2M)"]
    assert (paper.model, paper.dataset, paper.batch_size, paper.iterations, paper.milestones, paper.lr,
            paper.warmup_iters, paper.warmup_lr, paper.weight_decay, paper.momentum, paper.pad, paper.flip) == (
        "preact_resnet1001", "cifar10", 128, 64000, [32000, 48000], 0.1, 400, 0.01, 1e-4, 0.9, 4, True)
    dagger = by_label["CIFAR-10, ResNet-1001 [ours] (10.2M), batch 64 †"]
    assert (dagger.batch_size, dagger.iterations, dagger.milestones, dagger.nesterov, dagger.warmup_iters) == (
        64, 200 * 781, [80 * 781, 121 * 781], True, 0)
    assert by_label["CIFAR-10, ResNet-1001 [ours] (10.2M)"].out_dir != dagger.out_dir
    assert by_label["CIFAR-100, ResNet-164 [1] (1.7M)"].dataset == "cifar100"
    gate = {r.row.label: r.cfg.model_kwargs for r in build_plan(EXPERIMENTS["table1"], 1, str(tmp_path), "d", False)}
    assert gate["exclusive gating, b_g init -7"] == {"gate_bias": -7.0} and gate["original"] == {}
    smoke = build_plan(EXPERIMENTS["table3"], 1, str(tmp_path), "d", smoke=True)
    assert {(c.dataset, c.image_size, c.iterations, c.num_classes) for c in (r.cfg for r in smoke)} == {
        ("synthetic", 4, 2, 10), ("synthetic", 4, 2, 100)}
    assert Row("g", "l", "resnet110", paper="4.92 (4.89±0.14)").paper_error == 4.92
    assert Row("g", "l", "resnet110", paper="fail").paper_error is None


def test_shards_split_the_plan_disjointly_and_completely(tmp_path):
    for name, exp in EXPERIMENTS.items():
        plan = build_plan(exp, 5, str(tmp_path), "data", smoke=False)
        folders = [r.cfg.out_dir for r in plan]
        assert len(set(folders)) == len(plan), name                      # one folder per run
        for n in (1, 2, 3, 7):
            parts = [shard(plan, i, n) for i in range(1, n + 1)]
            got = [r.cfg.out_dir for part in parts for r in part]
            assert sorted(got) == sorted(folders), (name, n)              # complete and disjoint
            loads = [sum(r.cost for r in part) for part in parts]
            # greedy largest-first: no part exceeds another by more than the costliest run
            assert max(loads) - min(loads) <= max(r.cost for r in plan), (name, n, loads)
            assert [r.cfg.out_dir for r in parts[0]] == [f for f in folders if f in {r.cfg.out_dir for r in parts[0]}]


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiment_smoke_reproduces(smoke_out, name):
    exp = EXPERIMENTS[name]
    folder = smoke_out / name
    rows = _rows(folder / "rows.jsonl")
    assert [r["row"] for r in rows] == [row.label for row in exp.rows]  # one run per row, in table order
    for r in rows:
        assert r["experiment"] == name and r["seed"] == 0 and r["iterations"] == 2 and r["dataset"] == "synthetic"
        assert 0.0 <= r["test_err"] <= 100.0 and r["final_train_loss"] is not None and r["time_s"] > 0
        assert r["hardware"].startswith("cpu") and r["versions"]["torch"] == torch.__version__
        assert (smoke_out / r["run_dir"] / "last.pt").is_file()           # an ordinary trainer run folder
    report = (folder / "report.md").read_text()
    assert "Smoke run" in report
    for row in exp.rows:
        assert f"| {row.label} | {row.paper or '—'} |" in report
    for group, label, paper in exp.paper_only:
        assert f"| {label} | {paper} | not in this zoo |" in report
    pngs = ["curves.png"] + (["vs_paper.png"] if exp.default_runs > 1 else [])
    for png in pngs:
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![{png}]({png})" in report
    # the median column holds the rows' own test errors (one run each)
    for r in rows:
        assert f"| {r['row']} |" in report and f"{r['test_err']:.2f}" in report


def test_experiments_share_runs(smoke_out):
    """Table 4's ResNet-1001 and Fig. 1's curves are the same runs as Table 3's: trained once."""
    t3 = {r["run_dir"]: r for r in _rows(smoke_out / "table3" / "rows.jsonl")}
    for name in ("table4", "fig1"):
        for r in _rows(smoke_out / name / "rows.jsonl"):
            if r["run_dir"] in t3:
                assert r["finished"] == t3[r["run_dir"]]["finished"] and r["test_err"] == t3[r["run_dir"]]["test_err"]
    assert {r["run_dir"] for r in _rows(smoke_out / "fig1" / "rows.jsonl")} <= set(t3)
    all_dirs = {r["run_dir"] for name in EXPERIMENTS for r in _rows(smoke_out / name / "rows.jsonl")}
    assert len(all_dirs) == 31


def _count_fits(monkeypatch):
    calls = []
    fit = train.Trainer.fit

    def counting(self):
        calls.append(self.cfg.out_dir)
        return fit(self)
    monkeypatch.setattr(train.Trainer, "fit", counting)
    return calls


def test_killed_then_resumed_gives_the_same_rows_without_repeating_runs(smoke_out, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fastresnet.reproduce", "fig6", "--smoke", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    runs = out / "runs" / "smoke-cifar10"
    deadline = time.time() + 240
    while not list(runs.glob("*/seed0/result.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)                                     # during (or just before) the second run
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    finished = {p: p.read_bytes() for p in runs.glob("*/seed0/result.json")}
    assert 1 <= len(finished) < 4, err
    fits = _count_fits(monkeypatch)
    assert main(["fig6", "--smoke", "--out", str(out)]) == 0
    assert len(fits) == 4 - len(finished)                                # finished runs are not trained again
    assert {p: p.read_bytes() for p in finished} == finished
    resumed = _rows(out / "fig6" / "rows.jsonl")
    # CPU kernels are deterministic and the trainer resumes exactly, so the errors and losses match to the last bit
    assert _stable(resumed) == _stable(_rows(smoke_out / "fig6" / "rows.jsonl"))


def test_sharded_runs_add_up_to_the_whole(smoke_out, tmp_path, monkeypatch):
    out = str(tmp_path / "sharded")
    fits = _count_fits(monkeypatch)
    assert main(["fig6", "--smoke", "--out", out, "--shard", "1/2"]) == 0
    first = list(fits)
    assert 0 < len(first) < 4 and len(_rows(os.path.join(out, "fig6", "rows.jsonl"))) == len(first)
    assert "| — | — |" in open(os.path.join(out, "fig6", "report.md")).read()    # pending rows show as such
    assert main(["fig6", "--smoke", "--out", out, "--shard", "2/2"]) == 0
    assert len(fits) == 4 and not set(first) & set(fits[len(first):])
    assert main(["fig6", "--smoke", "--out", out, "--report-only"]) == 0 and len(fits) == 4
    assert _stable(_rows(os.path.join(out, "fig6", "rows.jsonl"))) == _stable(
        _rows(smoke_out / "fig6" / "rows.jsonl"))


def test_dry_run_prints_the_plan_with_estimates(smoke_out, tmp_path, capsys, monkeypatch):
    fits = _count_fits(monkeypatch)
    out = tmp_path / "dry"
    assert main(["fig6", "--dry-run", "--out", str(out), "--measure-batch", "2"]) == 0   # the paper's recipe
    text = capsys.readouterr().out
    for row in EXPERIMENTS["fig6"].rows:
        assert row.label in text
    assert "64000" in text and "total: 4 runs of 4 in the plan, 256,000 iterations" in text
    assert "scaled linearly" in text and "estimated" in text
    assert not fits and not out.exists()                                # nothing trained, nothing written
    # on the finished smoke folder: every run is done, nothing left to do
    assert main(["fig1", "--smoke", "--dry-run", "--out", str(smoke_out)]) == 0
    text = capsys.readouterr().out
    assert "total: 2 runs of 2 in the plan, 4 iterations; estimated 0.0 s to do" in text
    assert main(["table3", "--smoke", "--dry-run", "--out", str(smoke_out), "--shard", "1/4"]) == 0
    assert "shard 1/4" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["table9"], "invalid choice: 'table9'"),
    (["table1", "--shard", "3/2"], "--shard: expected i/n with 1 <= i <= n, got '3/2'"),
    (["table1", "--shard", "half"], "--shard: expected i/n"),
    (["table1", "--runs", "0"], "--runs: expected a positive integer, got 0"),
    (["table1", "--dry-run", "--measure-batch", "0"], "--measure-batch: expected a positive integer"),
    (["table1", "--amp", "fp8"], "--amp: expected one of"),
])
def test_bad_arguments_give_one_line_errors(args, message, capsys):
    try:
        code = cli.main(["reproduce", *args])
    except SystemExit as e:                                              # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and err[-1].startswith("fastresnet reproduce: error: "), err
    if "invalid choice" not in message:                                  # argparse adds its usage line above
        assert len(err) == 1, err


def test_a_folder_trained_with_another_recipe_is_refused(tmp_path, capsys):
    plan = build_plan(EXPERIMENTS["fig6"], 1, str(tmp_path), train.TrainConfig.data_dir, smoke=True)
    os.makedirs(plan[0].cfg.out_dir)
    with open(os.path.join(plan[0].cfg.out_dir, "config.json"), "w") as f:
        json.dump({**train.dataclasses.asdict(plan[0].cfg), "lr": 0.05}, f)
    assert cli.main(["reproduce", "fig6", "--smoke", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fastresnet reproduce: error: --out: the run folder") and "lr=0.05" in err


def test_report_summarises_runs_beside_the_paper():
    exp = EXPERIMENTS["table4"]
    label = "CIFAR-10, ResNet-1001 [ours] (10.2M)"
    rows = [{"row": label, "test_err": e} for e in (5.0, 4.8, 5.3, 4.6, 4.9)]
    rows += [{"row": "CIFAR-10, ResNet-110 [1] (1.7M)", "test_err": 85.0}]
    table = reproduce.report_table(exp, rows, 5)
    # median 4.90, mean 4.92, sample std sqrt(0.268 / 4) = 0.26; difference median − paper = 4.90 − 4.92
    assert f"| CIFAR-10 | {label} | 4.92 (4.89±0.14) | 4.90 | 4.92 ± 0.26 | 5/5 | -0.02 |" in table
    # "fail" is Table 1's notion only: elsewhere a high error is a plain difference (CIFAR-100 errors exceed 20%)
    assert "| CIFAR-10, ResNet-110 [1] (1.7M) | 6.61 | 85.00 | 85.00 ± 0.00 | 1/5 | +78.39 |" in table
    assert "| CIFAR-10, ResNet-1202 [1] (19.4M) | 7.93 | — | — | 0/5 | — |" in table
    t1 = reproduce.report_table(EXPERIMENTS["table1"], [{"row": "dropout shortcut (0.5)", "test_err": 90.0},
                                                        {"row": "constant scaling: shortcut 0.5, F 1",
                                                         "test_err": 9.0}], 1)
    assert "| dropout shortcut (0.5) | fail | 90.00 (fail) | 90.00 ± 0.00 | 1/1 | both fail |" in t1
    assert "| constant scaling: shortcut 0.5, F 1 | fail | 9.00 | 9.00 ± 0.00 | 1/1 | paper fails, here not |" in t1
    t1 = reproduce.report_table(EXPERIMENTS["table1"], [{"row": "original", "test_err": 30.0}], 1)
    assert "| original | 6.61 | 30.00 (fail) | 30.00 ± 0.00 | 1/1 | fails here, not in the paper |" in t1


def test_out_on_an_impossible_path_is_one_line_naming_out(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert cli.run_command("reproduce", reproduce.main, ["fig1", "--smoke", "--out", str(tmp_path / "a-file/x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastresnet reproduce: error: --out: cannot use "), err
    assert os.listdir(tmp_path) == ["a-file"]
