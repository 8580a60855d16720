"""A training run killed mid-way (SIGKILL once a checkpoint is written) and resumed with `resume_from_checkpoint`
ends where an uninterrupted run with the same seed ends: same per-step losses after the checkpoint, same
evaluation metrics, same weights.

The run is made to depend on everything a checkpoint must restore: dropout (the RNG states), a shuffled data order
over two epochs with the kill in the middle of the second (the sampler's epoch and position), AdamW (its moments)
and a warmup-then-linear learning rate (the scheduler).
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import train_tiny  # noqa: E402

HEAD = "sequence-classification"
BATCH = 4
NUM_EXAMPLES = 16  # 4 steps per epoch
MAX_STEPS = 8
KILLED_AFTER_STEP = 6
DROPOUT = 0.1
TRAINING_ARGS = dict(
    optim="adamw_torch",
    learning_rate=1e-3,
    lr_scheduler_type="linear",
    warmup_steps=2,
    max_grad_norm=1.0,
    save_strategy="steps",
    save_steps=3,
)
RUN_TIMEOUT_S = 180


def run_until_killed(output_dir: Path) -> subprocess.CompletedProcess:
    """Start the training in a separate process; SIGKILL it as soon as it reports the checkpoint of
    KILLED_AFTER_STEP written."""
    arguments = [
        sys.executable, str(SCRIPTS / "train_tiny.py"), "--heads", HEAD, "--output-dir", str(output_dir),
        "--per-device-batch", str(BATCH), "--max-steps", str(MAX_STEPS), "--dropout", str(DROPOUT),
        "--num-examples", str(NUM_EXAMPLES), "--evaluate", "--training-args", json.dumps(TRAINING_ARGS),
        "--pause-after-checkpoint", str(KILLED_AFTER_STEP),
    ]
    process = subprocess.Popen(arguments, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        for line in process.stdout:  # ends early only if the process exits before the checkpoint
            output.append(line)
            if line.startswith(f"CHECKPOINT SAVED {KILLED_AFTER_STEP}"):
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    return subprocess.CompletedProcess(arguments, process.returncode, "".join(output))


def train_in_process(output_dir: Path, resume_from_checkpoint: Path | None = None) -> dict:
    run = train_tiny.train(
        HEAD, output_dir, BATCH, MAX_STEPS, dropout=DROPOUT, num_examples=NUM_EXAMPLES, evaluate=True,
        resume_from_checkpoint=str(resume_from_checkpoint) if resume_from_checkpoint else None, **TRAINING_ARGS,
    )
    run["weights"] = train_tiny.weights_of(run["trainer"].model)
    run["global_step"] = run["trainer"].state.global_step
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("resume")
    killed = run_until_killed(work / "killed")
    run_dir = work / "killed" / HEAD
    checkpoints_at_kill = sorted(path.name for path in run_dir.glob("checkpoint-*"))
    resumed = None
    if killed.returncode == -signal.SIGKILL:
        resumed = train_in_process(run_dir, resume_from_checkpoint=run_dir / f"checkpoint-{KILLED_AFTER_STEP}")
    return {
        "killed": killed,
        "checkpoints_at_kill": checkpoints_at_kill,
        "resumed": resumed,
        "uninterrupted": train_in_process(work / "uninterrupted"),
        "run_dir": run_dir,
    }


def test_the_run_was_killed_after_its_checkpoint(runs):
    killed = runs["killed"]
    assert killed.returncode == -signal.SIGKILL, f"exit {killed.returncode}:\n{killed.stdout[-3000:]}"
    assert runs["checkpoints_at_kill"] == ["checkpoint-3", "checkpoint-6"]
    assert not (runs["run_dir"].parent / "results.json").exists()


def test_resumed_run_ends_like_the_uninterrupted_run(runs):
    resumed, uninterrupted = runs["resumed"], runs["uninterrupted"]
    assert resumed is not None, "the first run was not killed; see the test above"
    assert resumed["global_step"] == uninterrupted["global_step"] == MAX_STEPS
    assert all(torch.isfinite(torch.tensor(uninterrupted["losses"])))
    # The resumed run logs only the steps after the checkpoint.
    assert len(resumed["losses"]) == MAX_STEPS - KILLED_AFTER_STEP
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]), torch.tensor(uninterrupted["losses"][KILLED_AFTER_STEP:]), rtol=1e-6, atol=0
    )
    for metric in ("eval_loss", "eval_accuracy"):
        assert resumed["metrics"][metric] == pytest.approx(uninterrupted["metrics"][metric], rel=1e-6, abs=0), metric
    for name, weight in uninterrupted["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], weight, rtol=0, atol=1e-6, msg=lambda t: f"{name}: {t}")
