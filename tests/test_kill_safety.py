"""Files under kills and races: SIGKILL at random instants of a training run that checkpoints every iteration never
costs a loadable last.pt (and `--resume DIR/last.pt` continues from it); concurrent writers of one file through
`checkpoint.atomic_write` never fail and leave one whole version."""
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from fastresnet import checkpoint, cli, train

KILLS = 20         # SIGKILLs per test run
KILL_SEED = 28     # the random delays are drawn from random.Random(KILL_SEED)
# the job: the smallest net at batch 8, a checkpoint after every iteration, so that a checkpoint write (~2 MB with
# its momentum buffers, fsync included) is a large part of the time a kill can land in
JOB = ["--batch-size", "8", "--iterations", "100000", "--schedule", "constant", "--ckpt-every", "1", "--log-every",
       "1", "--eval-every", "0", "--no-plot"]


def _start_training(argv):
    """`fastresnet train ARGV` in a child process forked from this one (torch is imported already, so a round costs
    no start-up); returns (pid, the child's stderr as lines)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                            # the child: the command exactly as the console runs it
        code = 1
        try:
            os.close(read)
            os.dup2(write, 2)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            code = cli.run_command("train", train.main, argv)
        finally:
            os._exit(code)
    os.close(write)
    return pid, os.fdopen(read)


def _wait_for(lines, prefix):
    for line in lines:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"the run ended before a line starting with {prefix!r}")


def test_sigkill_during_checkpoint_writes_keeps_a_loadable_last_pt(tmp_path, one_thread):
    rng = random.Random(KILL_SEED)
    out = tmp_path / "run"
    last = out / "last.pt"
    train.Trainer(train.resolve_config([*JOB, "--out-dir", str(out)]))   # the lazy imports (scikit-learn, dynamo)
    assert not out.exists()                                 # happen here, once; setting up writes nothing
    iterations, interrupted_writes = [], 0
    for k in range(KILLS):
        start = iterations[-1] if k else 0
        pid, lines = _start_training([*JOB, *(["--resume", str(last)] if k else ["--out-dir", str(out)])])
        try:
            if k:   # the previous kill left a last.pt that --resume DIR/last.pt continues from
                line = _wait_for(lines, "resumed from")
                assert f"at iteration {start}" in line, line
            _wait_for(lines, f"it {start + 2}/")             # this process has written a checkpoint
            time.sleep(rng.uniform(0.0, 0.1))                # a random instant of the write-heavy loop
        finally:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            lines.close()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        interrupted_writes += bool(checkpoint.stale_temporaries(str(last)))
        ckpt = checkpoint.load(str(last))                   # raises CheckpointError if missing or partial
        assert not train._state_problem(ckpt)
        assert ckpt["iteration"] >= start + 1 and len(ckpt["history"]["loss"]) == ckpt["iteration"]
        iterations.append(ckpt["iteration"])
        if os.path.exists(out / "prev.pt"):                  # the one before (the same one if the kill came between)
            assert checkpoint.load(str(out / "prev.pt"))["iteration"] <= ckpt["iteration"]
    # the next run that writes into the folder removes what killed writers left, and never took it for a checkpoint
    trainer = train.Trainer(train.resolve_config([*JOB, "--resume", str(last), "--stop-at", str(iterations[-1] + 1)]))
    trainer.fit()
    assert trainer.iteration == iterations[-1] + 1
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")], os.listdir(out)
    print(f"{KILLS} kills at iterations {iterations}; {interrupted_writes} left a partial write behind")


def _write_rounds(path, tag, rounds):
    for i in range(rounds):
        checkpoint.write_text(path, json.dumps({"writer": tag, "i": i, "pad": "x" * 4000}) + "\n")


@pytest.mark.parametrize("writer", ["threads", "processes"])
def test_concurrent_atomic_writes_never_fail_and_leave_one_whole_version(tmp_path, writer):
    """Two writers of one file, 200 replaces each: no error (fixed temporary names made os.replace fail), and the
    file is always one writer's whole content, also to a reader in between."""
    path = tmp_path / "rows.jsonl"
    rounds = 200
    errors = []

    def write(tag):
        try:
            _write_rounds(str(path), tag, rounds)
        except Exception as e:  # noqa: BLE001  collected and asserted below
            errors.append(e)

    if writer == "threads":
        workers = [threading.Thread(target=write, args=(t,)) for t in "ab"]
    else:
        workers = [multiprocessing.get_context("fork").Process(target=_write_rounds, args=(str(path), t, rounds))
                   for t in "ab"]
    for w in workers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in workers):             # a reader meanwhile sees whole versions only
        if path.exists():
            assert len(json.loads(path.read_text())["pad"]) == 4000
            reads += 1
    for w in workers:
        w.join(timeout=120)
    assert not errors, errors[:3]
    assert writer == "threads" or all(w.exitcode == 0 for w in workers)
    assert reads > 0
    row = json.loads(path.read_text())
    assert row["writer"] in "ab" and row["i"] == rounds - 1 and len(row["pad"]) == 4000
    assert os.listdir(tmp_path) == ["rows.jsonl"]          # no temporary file left behind
