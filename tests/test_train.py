"""The trainer: configuration, convergence on digits, exact resume (stop and SIGTERM), checkpoint safety, outputs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastresnet import checkpoint
from fastresnet.train import Trainer, TrainConfig, lr_at, main, resolve_config
from threads import one_torch_thread

TINY = ["--batch-size", "16", "--log-every", "2", "--no-plot"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _fit(tmp_path, *args, name="run"):
    trainer = Trainer(resolve_config([*TINY, "--out-dir", str(tmp_path / name), *args]))
    return trainer, trainer.fit()


def test_config_layers_and_errors(tmp_path):
    cfg = resolve_config(["--preset", "cifar10"])
    assert (cfg.model, cfg.batch_size, cfg.iterations, cfg.milestones, cfg.weight_decay, cfg.pad, cfg.flip) == (
        "preact_resnet110", 128, 64000, [32000, 48000], 1e-4, 4, True)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "cifar100", "lr": 0.05, "iterations": 10}))
    cfg = resolve_config(["--config", str(path), "--iterations", "7", "--warmup-iters", "400"])
    assert (cfg.dataset, cfg.lr, cfg.iterations, cfg.warmup_iters) == ("cifar100", 0.05, 7, 400)  # flag > file
    assert resolve_config([]) == TrainConfig()                                                  # the digits job
    with pytest.raises(ValueError, match="--amp: expected one of"):
        resolve_config(["--amp", "fp8"])
    path.write_text(json.dumps({"learning_rate": 0.1}))
    with pytest.raises(ValueError, match="unknown fields.*learning_rate"):
        resolve_config(["--config", str(path)])
    with pytest.raises(RuntimeError, match="--cuda-graph: needs a CUDA device"):
        Trainer(TrainConfig(cuda_graph=True, device="cpu"))


def test_paper_lr_schedule():
    cfg = resolve_config(["--preset", "cifar10", "--warmup-iters", "400", "--warmup-lr", "0.01"])
    lrs = [lr_at(cfg, it, 64000, 390) for it in (0, 399, 400, 31999, 32000, 47999, 48000, 63999)]
    assert lrs == pytest.approx([0.01, 0.01, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    im = resolve_config(["--preset", "imagenet"])
    assert [lr_at(im, e * 100, 9000, 100) for e in (29, 30, 60)] == pytest.approx([0.1, 0.01, 0.001])


@pytest.mark.slow
def test_digits_learns(tmp_path):
    """A shortened default job (120 of 300 iterations, batch 32) already beats 80% test accuracy."""
    trainer, result = _fit(tmp_path, "--iterations", "120", "--batch-size", "32", "--log-every", "40",
                           "--eval-every", "40", "--plot")
    assert result["test_acc"] > 80.0, result
    out = tmp_path / "run"
    for name in ("config.json", "last.pt", "metrics.csv", "metrics.json", "curves.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["iterations"] == 120
    assert len(json.loads((out / "metrics.json").read_text())["iteration_loss"]) == 120
    assert (out / "metrics.csv").read_text().count("\n") == 1 + 3           # header + iterations 40, 80, 120


def test_resume_is_exact(tmp_path):
    """Stop at iteration 4 of 8 (as a kill would, checkpoint included), resume: same per-iteration losses, bitwise."""
    args = ["--iterations", "8", "--schedule", "step", "--milestones", "3", "6"]
    full, _ = _fit(tmp_path, *args, name="full")
    _, stopped = _fit(tmp_path, *args, "--stop-at", "4", name="cut")
    assert stopped["stopped"] and stopped["iteration"] == 4
    resumed, _ = _fit(tmp_path, *args, "--resume", "auto", name="cut")
    # CPU kernels are deterministic and every input of iteration i (data order, augmentation, LR, weights, momentum)
    # is restored exactly, so the losses match to the last bit
    assert resumed.history["loss"] == full.history["loss"] and len(full.history["loss"]) == 8
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


@pytest.mark.slow
def test_sigterm_saves_and_resumes_exactly(tmp_path):
    """SIGTERM to a running `python -m fastresnet.train`: it checkpoints, exits 143, and resuming continues exactly."""
    args = [*TINY, "--iterations", "2000", "--schedule", "constant", "--log-every", "1"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fastresnet.train", *args, "--out-dir", str(out)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    for line in proc.stderr:
        if line.startswith("it 3/") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    ckpt = checkpoint.load(str(out / "last.pt"))
    k = ckpt["iteration"]
    assert k >= 3 and len(ckpt["history"]["loss"]) == k
    resumed = Trainer(resolve_config([*args, "--out-dir", str(out), "--resume", "auto", "--stop-at", str(k + 2)]))
    resumed.fit()
    full = Trainer(resolve_config([*args, "--out-dir", str(tmp_path / "full"), "--stop-at", str(k + 2)]))
    full.fit()
    assert resumed.history["loss"] == full.history["loss"]                  # bitwise, as in test_resume_is_exact


def test_truncated_checkpoint_is_refused_and_good_one_survives(tmp_path, monkeypatch):
    trainer, _ = _fit(tmp_path, "--iterations", "2")
    last = tmp_path / "run" / "last.pt"
    good = last.read_bytes()
    # a write that dies half-way (disk full, kill) leaves the previous file as it was and no temporary behind
    def dying_save(obj, f):
        f.write(good[: len(good) // 2])
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(trainer.state(), str(last))
    monkeypatch.undo()
    assert last.read_bytes() == good and os.listdir(last.parent).count("last.pt") == 1
    assert not [n for n in os.listdir(last.parent) if n.endswith(".tmp")]
    # a truncated file (copied half-way, say) gives an error naming it
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="bad.pt.*truncated, corrupt"):
        checkpoint.load(str(bad))
    # resuming from a corrupt last.pt refuses clearly and leaves prev.pt intact
    trainer.save_checkpoint()
    prev = (tmp_path / "run" / "prev.pt").read_bytes()
    last.write_bytes(good[:100])
    with pytest.raises(checkpoint.CheckpointError, match="last.pt"):
        Trainer(resolve_config([*TINY, "--iterations", "2", "--out-dir", str(tmp_path / "run"), "--resume",
                                "auto"])).fit()
    assert (tmp_path / "run" / "prev.pt").read_bytes() == prev
    assert checkpoint.load(str(tmp_path / "run" / "prev.pt"))["iteration"] == 2


def test_save_after_a_kill_between_keeping_prev_and_replacing_last(tmp_path):
    # a writer killed after keeping last.pt as prev.pt (a hard link) and before moving its new file onto last.pt
    # leaves prev.pt and last.pt one file; the next save keeps it as prev.pt and leaves no temporary behind
    last, prev = tmp_path / "last.pt", tmp_path / "prev.pt"
    checkpoint.save({"iteration": 1, "model": {}}, str(last))
    os.link(last, prev)
    checkpoint.save({"iteration": 2, "model": {}}, str(last), previous=str(prev))
    assert checkpoint.load(str(last))["iteration"] == 2 and checkpoint.load(str(prev))["iteration"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "prev.pt"]


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"iteration": 1, "model": {}, "x": _Payload()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="evil.pt"):
        checkpoint.load(str(path))


def test_runs_report_median_and_spread(tmp_path, capsys):
    assert main([*TINY, "--iterations", "2", "--runs", "2", "--out-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["test_err"]) == 2 and (tmp_path / "run1" / "last.pt").is_file()
    assert json.loads((tmp_path / "run1" / "config.json").read_text())["seed"] == 1
    assert "median" in capsys.readouterr().out


def test_cli_dispatches(capsys):
    from fastresnet import cli
    assert cli.main(["--help"]) == 0 and "train" in capsys.readouterr().out
    assert cli.main(["bogus"]) == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0 and "--sync-bn" in capsys.readouterr().out


REFUSED_RESUMES = {   # id -> (change to the finished run's folder or None, arguments of the refused resume)
    "other-batch-size": (None, ["--batch-size", "8"]),
    "other-model": (None, ["--model", "preact_resnet32"]),
    "other-model-kwargs": (None, ["--model-kwargs", '{"shortcut": "conv"}']),
    "other-num-classes": (None, ["--num-classes", "12"]),
    "other-seed": (None, ["--seed", "3"]),
    "truncated-last": ("truncate", []),
    "junk-contents": ("junk", []),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished") / "run"
    with one_torch_thread():
        assert main([*TINY, "--iterations", "2", "--ckpt-every", "1", "--eval-every", "0", "--out-dir",
                     str(folder)]) == 0
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("case_id", sorted(REFUSED_RESUMES))
def test_refused_resume_leaves_the_run_folder_byte_identical(finished_run, case_id, tmp_path, capsys):
    """Checkpoint and config are checked before anything is written: config.json keeps the run's own settings."""
    from fastresnet import cli
    change, args = REFUSED_RESUMES[case_id]
    folder = tmp_path / "run"
    folder.mkdir()
    for name, content in finished_run.items():
        (folder / name).write_bytes(content)
    if change == "truncate":
        (folder / "last.pt").write_bytes(finished_run["last.pt"][:1000])
    elif change == "junk":
        torch.save({"iteration": 2, "model": {"fc.weight": "junk"}, "optimizer": {}, "config": {}}, folder / "last.pt")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(before) >= {"config.json", "last.pt", "prev.pt", "metrics.csv", "metrics.json"}
    for resume in (str(folder / "last.pt"), "auto"):
        assert cli.main(["train", *TINY, "--iterations", "4", "--resume", resume, "--out-dir", str(folder),
                         *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fastresnet train: error: checkpoint "), err
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
