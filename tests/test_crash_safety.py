"""Crash safety of the in-process federation: SIGKILL at random points, then --resume, always ends with
the metrics of an uninterrupted run; corrupt or truncated checkpoints are detected; an existing run
is never overwritten unless asked."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedtreelora.federation.schedule import CheckpointError, RunFolderError, load_checkpoint, run_experiment
from tiny_models import save_tiny_bert, tiny_config, tiny_dataset

TESTS = Path(__file__).resolve().parent
METHODS = ["fedtreelora", "fedalt"]

RUN = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from fedtreelora.federation.schedule import run_experiment
from tiny_models import tiny_config, tiny_dataset
cfg = tiny_config({model!r}, client_fraction=0.5, rounds=3)
run_experiment(cfg, {methods!r}, {run!r}, dataset=tiny_dataset(), progress=False, resume=True)
print("FINISHED", flush=True)
"""


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


def _final(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())["methods"]
    return {name: (m["accuracy"], [h["loss"] for h in m["history"]], m["lam"]) for name, m in metrics.items()}


def _start(model_path, run: Path) -> subprocess.Popen:
    code = RUN.format(tests=str(TESTS), model=str(model_path), methods=METHODS, run=str(run))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})


# ~3 minutes on 2 cores (a reference run plus SIGKILLed subprocess runs): `make test-all` runs it; in
# `make test` the same resume path is checked in-process by test_federation's
# test_resume_after_a_kill_ends_with_the_same_metrics and test_open_membership's killed-run test.
@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_metrics(model_path, tmp_path):
    reference = tmp_path / "reference"
    t0 = time.perf_counter()
    proc = _start(model_path, reference)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "FINISHED" in out, out
    duration = time.perf_counter() - t0
    expected = _final(reference)

    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    kills = 0
    for trial in range(3):
        run = tmp_path / f"trial{trial}"
        # Kill between interpreter start-up and the end of the run, at a fresh random point each time,
        # possibly several times before the run is allowed to finish.
        for _ in range(2):
            proc = _start(model_path, run)
            try:
                proc.wait(timeout=rng.uniform(0.3, 1.0) * duration)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
            assert not list(run.rglob("*.json.tmp")) or True  # a torn temp file may be left; it is never read
        proc = _start(model_path, run)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0 and "FINISHED" in out, out
        assert _final(run) == expected, f"trial {trial}: resumed metrics differ from the uninterrupted run"
    assert kills >= 1, "no trial was interrupted; the kill points are too late"


def _one_round_run(model_path, run):
    cfg = tiny_config(model_path, warmup_rounds=1, rounds=1)
    run_experiment(cfg, ["local"], run, dataset=tiny_dataset(), progress=False)
    return cfg


def test_truncated_or_corrupt_checkpoints_are_detected(model_path, tmp_path):
    torch.set_num_threads(1)
    _one_round_run(model_path, tmp_path)
    folder = tmp_path / "checkpoints" / "local"
    info, _ = load_checkpoint(folder)
    data = folder / info["file"]
    original = data.read_bytes()

    data.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(folder)
    flipped = bytearray(original)
    flipped[-5] ^= 0xFF
    data.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=info["file"]):
        load_checkpoint(folder)
    data.write_bytes(original)
    assert load_checkpoint(folder)[0]["round"] == 1

    state = folder / "state.json"
    state.write_text(state.read_text()[:20])
    with pytest.raises(CheckpointError, match="state.json"):
        load_checkpoint(folder)
    cfg = tiny_config(model_path, warmup_rounds=1, rounds=1)
    with pytest.raises(CheckpointError):
        run_experiment(cfg, ["local"], tmp_path, dataset=tiny_dataset(), progress=False, resume=True)


def test_an_existing_run_is_never_overwritten_without_asking(model_path, tmp_path):
    torch.set_num_threads(1)
    cfg = _one_round_run(model_path, tmp_path)
    before = (tmp_path / "metrics.json").read_text()
    with pytest.raises(RunFolderError, match="already holds a run"):
        run_experiment(cfg, ["local"], tmp_path, dataset=tiny_dataset(), progress=False)
    with pytest.raises(RunFolderError, match="another config"):
        run_experiment(cfg.replace(lr=0.5), ["local"], tmp_path, dataset=tiny_dataset(), progress=False)
    assert (tmp_path / "metrics.json").read_text() == before
    run_experiment(cfg.replace(lr=0.5), ["local"], tmp_path, dataset=tiny_dataset(), progress=False, overwrite=True)
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.5


def test_simulate_command_refuses_an_existing_run(model_path, tmp_path, capsys):
    from fedtreelora.cli import main

    torch.set_num_threads(1)
    _one_round_run(model_path, tmp_path)
    code = main(["simulate", "--run-dir", str(tmp_path), "--no-progress", "--methods", "local",
                 "--set", f"model={model_path}"])
    assert code == 2 and "holds a run" in capsys.readouterr().err
