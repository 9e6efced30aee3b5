"""The command line as a user meets it: one-line errors with exit code 2 for every documented bad input, a new
output folder per run, a last line that names it, Ctrl-C at start-up, `| head`, `fastresnet info`, the profile's
order and the benchmark report's smoke rows."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastresnet
from benchmarks import common, report
from fastresnet import cli, profile, train
from threads import one_torch_thread

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "16", "--iterations", "1", "--eval-every", "0", "--no-plot"]


class _Hostile:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _cifar_with_hostile_pickle(root):
    """A CIFAR-10 folder whose first batch is a pickle that would run a shell command when loaded unsafely."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": _Hostile(), b"labels": [0]}, protocol=2))
    return root


BAD_INPUTS = ["amp", "unknown-model", "model-kwargs", "backend-name", "missing-config", "config-not-json",
              "missing-checkpoint", "missing-data", "hostile-pickle", "profile-filter", "profile-classes", "no-cuda"]


def _bad_inputs(tmp):
    """id -> (command line, text the one-line error must contain: the argument's name or the refusal)."""
    (tmp / "bad.json").write_text("{not json")
    (tmp / "empty").mkdir()
    cases = {
        "amp": (["train", "--amp", "fp8"], "--amp"),
        "unknown-model": (["train", "--model", "preact_resnet2O"], "--model"),
        "model-kwargs": (["train", *TINY, "--model-kwargs", '{"widen": 2}'], "--model-kwargs"),
        "backend-name": (["train", "--backend", "fastest"], "--backend"),
        "missing-config": (["train", "--config", str(tmp / "nope.json")], "--config"),
        "config-not-json": (["train", "--config", str(tmp / "bad.json")], "--config"),
        "missing-checkpoint": (["train", "--resume", str(tmp / "nope" / "last.pt")], "--resume"),
        "missing-data": (["train", "--dataset", "cifar10", "--data-dir", str(tmp / "empty")], "data_dir"),
        "hostile-pickle": (["train", "--dataset", "cifar10", "--data-dir", str(_cifar_with_hostile_pickle(tmp / "c"))],
                           "refusing to load the global posix.system"),
        "profile-filter": (["profile", "--models", "vgg*"], "--models"),
        "profile-classes": (["profile", "--num-classes", "0"], "--num-classes"),
        "no-cuda": (["train", "--device", "cuda"], "--device"),
    }
    if torch.cuda.is_available():
        del cases["no-cuda"]
    return cases


def _fastresnet(args, cwd, **kw):
    """Run the console script's code (`python -m fastresnet.cli`) in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FASTRESNET_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "fastresnet.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, **kw)


@pytest.mark.parametrize("case_id", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(case_id, tmp_path, monkeypatch, capsys):
    cases = _bad_inputs(tmp_path)
    assert set(cases) <= set(BAD_INPUTS)
    if case_id not in cases:
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    args, needle = cases[case_id]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTRESNET_DEBUG", raising=False)
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"fastresnet {args[0]}: error: ") and needle in lines[0], lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run folder left behind


@pytest.mark.slow  # a fresh Python process
def test_the_console_script_prints_one_line_and_exits_2(tmp_path):
    """The process a user starts: the error line on stderr and exit status 2 (the cases above run its code in this
    process)."""
    proc = _fastresnet(["train", "--amp", "fp8"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastresnet train: error: --amp"), proc.stderr
    assert proc.stdout == "" and not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(monkeypatch):
    with pytest.raises(ValueError, match="--amp"):
        cli.main(["train", "--amp", "fp8", "--debug"])
    monkeypatch.setenv("FASTRESNET_DEBUG", "1")
    with pytest.raises(ValueError, match="--amp"):
        cli.main(["train", "--amp", "fp8"])


def test_each_run_gets_its_own_folder_and_the_last_line_names_it(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)

    def last_line(args):
        assert train.main([*TINY, *args]) == 0
        return capsys.readouterr().out.strip().splitlines()[-1]

    assert last_line([]) == "outputs in runs/digits-preact_resnet20"
    assert last_line([]) == "outputs in runs/digits-preact_resnet20-2"          # the first is not overwritten
    assert last_line(["--model", "preact_resnet32"]) == "outputs in runs/digits-preact_resnet32"
    # --resume auto continues the newest run of that dataset and model, in its folder
    assert last_line(["--iterations", "2", "--resume", "auto"]) == "outputs in runs/digits-preact_resnet20-2"
    assert json.loads((tmp_path / "runs/digits-preact_resnet20-2/metrics.json").read_text())["config"][
        "iterations"] == 2
    assert (tmp_path / "runs/digits-preact_resnet20/last.pt").is_file()
    # a stopped run ends with the folder too; --out-dir is used as given
    assert last_line(["--iterations", "3", "--stop-at", "1", "--out-dir", "mine"]) == "outputs in mine"
    assert (tmp_path / "mine/last.pt").is_file()
    assert sorted(os.listdir(tmp_path / "runs")) == [
        "digits-preact_resnet20", "digits-preact_resnet20-2", "digits-preact_resnet32"]
    # a run that fails at start-up removes the folder it had claimed
    assert cli.main(["train", *TINY, "--model-kwargs", '{"widen": 2}']) == 2
    assert len(os.listdir(tmp_path / "runs")) == 3


def test_resume_auto_without_an_earlier_run_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--resume", "auto"]) == 2
    assert "--resume auto: no earlier run with a checkpoint in runs/digits-preact_resnet20" in capsys.readouterr().err


def test_resume_auto_skips_newer_folders_without_a_checkpoint(tmp_path, monkeypatch, capsys, one_thread):
    """A newer folder left without a checkpoint (a run killed before its first one) is not where `auto` resumes."""
    monkeypatch.chdir(tmp_path)
    assert train.main([*TINY, "--stop-at", "1", "--iterations", "3"]) == 0
    (tmp_path / "runs/digits-preact_resnet20-2").mkdir()
    (tmp_path / "runs/digits-preact_resnet20-2/config.json").write_text("{}")
    capsys.readouterr()
    assert train.main([*TINY, "--iterations", "3", "--resume", "auto"]) == 0
    out = capsys.readouterr()
    assert "resumed from runs/digits-preact_resnet20/last.pt at iteration 1" in out.err
    assert out.out.strip().splitlines()[-1] == "outputs in runs/digits-preact_resnet20"


@pytest.mark.slow  # a fresh Python process
def test_ctrl_c_during_start_up_is_one_line_exit_130(tmp_path):
    # Ctrl-C while the data loads (before the trainer's own SIGINT handler exists), simulated by the loader raising
    code = ("import sys, fastresnet.data as d\n"
            "def interrupted(*a, **k): raise KeyboardInterrupt\n"
            "d.load_digits = interrupted\n"
            "from fastresnet import cli\n"
            "sys.exit(cli.main(['train']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "fastresnet train: interrupted"
    assert not (tmp_path / "runs").exists()    # the folder claimed for the run, and runs/, are gone again


@pytest.mark.slow  # a fresh Python process
@pytest.mark.parametrize("delay", [0.3, 1.0])
@pytest.mark.parametrize("entry", ["console script", "python -m"])
def test_ctrl_c_while_importing_is_one_line_exit_130(tmp_path, entry, delay):
    """A real SIGINT in the first second, while the package imports torch (before any command code runs)."""
    script = tmp_path / "fastresnet"          # what pip writes for the console script
    script.write_text("import sys\nfrom fastresnet.cli import main\nsys.exit(main())\n")
    args = [str(script), "train"] if entry == "console script" else ["-m", "fastresnet.train"]
    proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "fastresnet train: interrupted\n", (proc.returncode, err)
    assert out == "" and not (tmp_path / "runs").exists()


@pytest.mark.slow  # a fresh Python process
def test_profile_into_head_ends_quietly(tmp_path):
    proc = subprocess.run(["bash", "-c", f'"{sys.executable}" -m fastresnet.profile | head -3; '
                           'echo "status ${PIPESTATUS[0]}" >&2'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert len(proc.stdout.splitlines()) == 3 and proc.stdout.startswith("model")
    assert proc.stderr.strip() == "status 141", proc.stderr   # 128 + SIGPIPE, no traceback


@pytest.mark.slow  # a fresh Python process
def test_profile_help_names_the_command_and_sorts_naturally(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["profile", "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: fastresnet profile")
    assert profile.main(["--models", "preact_resnet1[01]*"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names == ["preact_resnet101", "preact_resnet110", "preact_resnet110_1layer", "preact_resnet1001"]


def test_info_reports_versions_backends_and_the_build(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["python"]
    assert info["backends"] == fastresnet.available_backends()
    from fastresnet import _C
    assert info["extension"].startswith("C++ CPU kernels")
    assert ("CUDA kernels for sm_" in info["extension"]) == _C.with_cuda
    assert info["triton_cache"]
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "triton cache" in text and "extension" in text and torch.__version__ in text


def test_report_says_which_smoke_rows_it_leaves_out(capsys):
    files = [os.path.join(REPO, "benchmarks/results", f) for f in ("models_cpu.jsonl", "kernels_cpu.jsonl")]
    smoke = report.count_smoke(common.read_rows(files))
    assert smoke > 0   # the committed per-op CPU rows come from a --cpu-smoke run
    block = report.main([*files, "--no-plots"])
    assert f"left out {smoke} rows of --cpu-smoke runs" in capsys.readouterr().err
    assert "Training step" in block and "Fused kernels" not in block
    block = report.main([*files, "--no-plots", "--include-smoke"])
    assert "Fused kernels" in block and "left out" not in capsys.readouterr().err


def test_benchmark_runs_write_outside_the_checkout(tmp_path, monkeypatch):
    env = {"device": "cpu", "run_id": "20260101T000000Z"}
    monkeypatch.delenv(common.OUTPUT_DIR_ENV, raising=False)
    assert common.default_out("models", env) == common.output_dir() / "models_cpu_20260101T000000Z.jsonl"
    assert common.output_dir().name == "benchmark-results" and not common.output_dir().is_absolute()
    monkeypatch.setenv(common.OUTPUT_DIR_ENV, str(tmp_path))
    assert common.default_out("kernels", env).parent == tmp_path


def test_start_up_handler_only_in_command_processes():
    from fastresnet import _startup
    py = "/usr/bin/python3"
    assert _startup.command_name(["/usr/local/bin/fastresnet", "train"], [py, "/usr/local/bin/fastresnet"]) == "train"
    assert _startup.command_name(["-m"], [py, "-m", "fastresnet.train", "--lr", "1"]) == "train"
    assert _startup.command_name(["-m"], [py, "-m", "fastresnet.cli", "profile"]) == "profile"
    assert _startup.command_name(["-m"], [py, "-m", "fastresnet.cli"]) == ""
    assert _startup.command_name(["-m"], [py, "-m", "pytest", "fastresnet"]) is None
    assert _startup.command_name(["script.py"], [py, "script.py"]) is None     # a program importing the package


# ---- every bad value: one line naming the argument, exit 2, nothing written ----------------------------------------
def _junk_checkpoint(path):
    """The keys of a training checkpoint with contents that are not one."""
    torch.save({"version": 1, "iteration": "seven", "model": {"fc.weight": 3}, "optimizer": [], "scaler": {},
                "rng": {}, "config": {}, "history": {}, "world_size": 1}, path)


def _cifar_batches(root, batch):
    """A CIFAR-10 folder whose every batch file holds `batch` (bytes, written as they are)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(batch)
    return root


BAD_VALUES = {   # id -> (arguments after `train`, or a function of the folder giving them; text the line must hold)
    "epochs-inf": (["--epochs", "inf"], "--epochs: expected a finite number >= 0, got inf"),
    "num-classes-negative": (["--num-classes", "-1"], "--num-classes: expected an integer >= 0, got -1"),
    "image-size-negative": (["--image-size", "-3"], "--image-size: expected an integer >= 0, got -3"),
    "lr-inf": (["--lr", "inf"], "--lr: expected a finite number > 0, got inf"),
    "momentum-nan": (["--momentum", "nan"], "--momentum: expected a finite number >= 0, got nan"),
    "weight-decay-nan": (["--weight-decay", "nan"], "--weight-decay: expected a finite number >= 0, got nan"),
    "seed-negative": (["--seed", "-1"], "--seed: expected an integer in [0, "),
    "nesterov-without-momentum": (["--nesterov", "--momentum", "0"], "--nesterov: needs --momentum > 0"),
    "model-kwargs-not-object": (["--model-kwargs", "[1]"], "--model-kwargs: expected a JSON object, got [1]"),
    "config-batch-size-str": ({"batch_size": "64"}, "--batch-size: expected an integer >= 1, got '64' (in --config"),
    "config-lr-str": ({"lr": "0.1"}, "--lr: expected a finite number > 0, got '0.1' (in --config"),
    "config-iterations-float": ({"iterations": 2.5}, "--iterations: expected an integer >= 0, got 2.5 (in --config"),
    "config-milestones-number": ({"milestones": 5}, "--milestones: expected a list of finite numbers >= 0, got 5"),
    "config-flip-str": ({"flip": "yes"}, "--flip: expected true or false, got 'yes'"),
    "config-preset-unknown": ({"preset": "mnist"}, "--preset: expected one of"),
    "config-not-object": ([1, 2], "must hold a JSON object"),
    "resume-other-model-kwargs": (lambda d: ["--resume", str(d / "good/last.pt"), "--model-kwargs",
                                             '{"shortcut": "conv"}'], "was trained with model_kwargs={}"),
    "resume-other-num-classes": (lambda d: ["--resume", str(d / "good/last.pt"), "--num-classes", "12"],
                                 "was trained with num_classes=0"),
    "checkpoint-junk-contents": (lambda d: ["--resume", str(d / "junk/last.pt")],
                                 "not a fastresnet training state (iteration: expected an integer >= 0"),
    "cifar-labels-none": (lambda d: ["--dataset", "cifar10", "--data-dir", str(d / "cifar-none")],
                          "data_batch_1: b'labels' must be a list of 2 integer labels, got NoneType"),
    "cifar-junk-pickle": (lambda d: ["--dataset", "cifar10", "--data-dir", str(d / "cifar-junk")],
                          "data_batch_1: not a pickle of a CIFAR batch"),
    "out-dir-under-a-file": (lambda d: ["--out-dir", str(d / "a-file/run")], "--out-dir: cannot use"),
}


@pytest.fixture(scope="module")
def bad_value_folder(tmp_path_factory):
    """A finished run to resume (good/), a junk checkpoint (junk/), two broken CIFAR folders and a plain file."""
    d = tmp_path_factory.mktemp("values")
    with one_torch_thread():
        assert train.main([*TINY, "--out-dir", str(d / "good")]) == 0
    (d / "junk").mkdir()
    _junk_checkpoint(d / "junk" / "last.pt")
    _cifar_batches(d / "cifar-none", pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": None},
                                                   protocol=2))
    _cifar_batches(d / "cifar-junk", b"\x1c\x00 not a pickle")
    (d / "a-file").write_text("")
    return d


def _tree(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case_id", sorted(BAD_VALUES))
def test_bad_value_is_one_line_exit_2_and_writes_nothing(bad_value_folder, case_id, tmp_path, monkeypatch, capsys):
    args, needle = BAD_VALUES[case_id]
    if callable(args):
        args = args(bad_value_folder)
    elif not isinstance(args, list) or case_id == "config-not-object":
        (tmp_path / "c.json").write_text(json.dumps(args))
        args = ["--config", str(tmp_path / "c.json")]
    monkeypatch.chdir(tmp_path)
    before = _tree(bad_value_folder)
    capsys.readouterr()
    assert cli.main(["train", *TINY, *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastresnet train: error: ") and needle in lines[0], lines
    assert _tree(bad_value_folder) == before and not (tmp_path / "runs").exists()


def test_a_run_that_fails_in_its_first_step_leaves_no_folder(tmp_path, monkeypatch, capsys, one_thread):
    """The first training step is where a backend meets the tensors; failing there leaves nothing either."""
    from fastresnet.backends.base import BackendUnsupportedError

    def refuse(self, x, y):
        raise BackendUnsupportedError("backend 'ext' cannot run this call: (simulated)")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train.Trainer, "train_step", refuse)
    assert cli.main(["train", *TINY]) == 2
    assert cli.main(["train", *TINY, "--out-dir", "mine"]) == 2
    assert "simulated" in capsys.readouterr().err and os.listdir(tmp_path) == []
