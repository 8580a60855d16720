"""Training and inference on several processes, on CPU exactly as on two GPUs (gloo instead of NCCL).

One `accelerate launch` and one `torchrun` run, of two processes each, do all the multi-process work; the tests
read what they wrote:
- DDP with Trainer (tests/scripts/train_tiny.py): per step, the loss logged under two processes equals the loss of
  one process on the same global batch, and the final weights are equal, for heads whose loss ignores Trainer's
  `num_items_in_batch` (declared with `accepts_loss_kwargs = False`) and heads whose loss divides by it.
- FSDP2 (tests/scripts/shard_tiny.py): `fully_shard` per layer then on the model; the full state dict it gathers
  loads back through save_pretrained / from_pretrained with the trained weights and the same outputs.
- Tensor parallelism with the config's `base_model_tp_plan` (from_pretrained with DistributedConfig(tp_plan="auto")).
The rest runs in this process: the tp plan names real modules, `num_items_in_batch` reaches the losses that use
it, and device_map="auto" loading, with and without offloading to disk.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoModelForSeq2SeqLM

import modeling_selfattn
from modeling_selfattn import SelfAttnConfig

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import shard_tiny  # noqa: E402
import train_tiny  # noqa: E402

NUM_PROCESSES = 2
GLOBAL_BATCH = 8
STEPS = 3
LAUNCH_TIMEOUT_S = 300
# Heads whose loss is a mean over the process's batch, and heads whose loss divides by Trainer's count of scored
# tokens over all processes.
LOSS_IGNORES_NUM_ITEMS = ["sequence-classification", "multiple-choice", "question-answering"]
LOSS_USES_NUM_ITEMS = ["token-classification", "masked-lm", "causal-lm", "seq2seq"]
TORCHRUN_DDP_HEADS = ["sequence-classification", "token-classification"]
# Float sums in another order (two partial gradients, then their mean) are all that may differ.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(arguments: list[str]) -> None:
    """Run a launcher on CPU, GPUs hidden (transformers' tensor parallelism and FSDP's default mesh would take
    the GPU where there is one); on failure, fail with the end of its output."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    try:
        done = subprocess.run(
            arguments, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, start_new_session=True
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{arguments[:4]} did not finish in {LAUNCH_TIMEOUT_S} s:\n{str(error.stderr)[-3000:]}")
    if done.returncode != 0:
        pytest.fail(f"{' '.join(arguments[:6])} ... failed ({done.returncode}):\n{(done.stdout + done.stderr)[-5000:]}")


def read_runs(output_dir: Path) -> dict:
    runs = json.loads((output_dir / "results.json").read_text())
    for head, run in runs.items():
        run["weights"] = load_file(str(output_dir / head / "model.safetensors"))
    return runs


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory) -> dict:
    """Every head trained in this process on the global batch."""
    output_dir = tmp_path_factory.mktemp("one-process")
    train_tiny.main(
        ["--heads", *LOSS_IGNORES_NUM_ITEMS, *LOSS_USES_NUM_ITEMS, "--output-dir", str(output_dir),
         "--per-device-batch", str(GLOBAL_BATCH), "--max-steps", str(STEPS)]
    )
    return read_runs(output_dir)


@pytest.fixture(scope="module")
def accelerate_runs(tmp_path_factory) -> dict:
    """Every head trained by `accelerate launch --multi_gpu` with two CPU processes, half the batch each."""
    output_dir = tmp_path_factory.mktemp("accelerate")
    launch(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(NUM_PROCESSES),
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), str(SCRIPTS / "train_tiny.py"),
         "--heads", *LOSS_IGNORES_NUM_ITEMS, *LOSS_USES_NUM_ITEMS, "--output-dir", str(output_dir),
         "--per-device-batch", str(GLOBAL_BATCH // NUM_PROCESSES), "--max-steps", str(STEPS)]
    )
    return read_runs(output_dir)


@pytest.fixture(scope="module")
def torchrun_output(tmp_path_factory) -> Path:
    """DDP for two heads, then FSDP2 and tensor parallelism, in one `torchrun` of two CPU processes."""
    output_dir = tmp_path_factory.mktemp("torchrun")
    launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NUM_PROCESSES),
         str(SCRIPTS / "shard_tiny.py"), "--output-dir", str(output_dir), "--ddp-heads", *TORCHRUN_DDP_HEADS,
         "--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH)]
    )
    return output_dir


@pytest.fixture(scope="module")
def torchrun_results(torchrun_output) -> dict:
    return torch.load(torchrun_output / "results.pt")


def assert_same_training(one_process: dict, several: dict, head: str) -> None:
    assert several["world_size"] == NUM_PROCESSES, "the launcher started one process, not two"
    assert several["accepts_loss_kwargs"] is (head in LOSS_USES_NUM_ITEMS)
    assert len(several["losses"]) == len(one_process["losses"]) == STEPS
    torch.testing.assert_close(
        torch.tensor(several["losses"]), torch.tensor(one_process["losses"]), rtol=LOSS_RTOL, atol=0,
        msg=lambda text: f"{head}: losses of {NUM_PROCESSES} processes {several['losses']} vs one process "
        f"{one_process['losses']}\n{text}",
    )
    for name, weight in one_process["weights"].items():
        torch.testing.assert_close(
            several["weights"][name], weight, rtol=0, atol=WEIGHT_ATOL, msg=lambda text: f"{name}: {text}"
        )


@pytest.mark.parametrize("head", LOSS_IGNORES_NUM_ITEMS + LOSS_USES_NUM_ITEMS)
def test_accelerate_ddp_trains_like_one_process(head, one_process_runs, accelerate_runs):
    assert_same_training(one_process_runs[head], accelerate_runs[head], head)


@pytest.mark.parametrize("head", TORCHRUN_DDP_HEADS)
def test_torchrun_ddp_trains_like_one_process(head, one_process_runs, torchrun_output):
    assert_same_training(one_process_runs[head], read_runs(torchrun_output / "ddp")[head], head)


@pytest.mark.parametrize("head", LOSS_USES_NUM_ITEMS)
def test_loss_divides_by_num_items_in_batch(head):
    """What several processes rely on: with Trainer's count of scored tokens over all processes, the loss is this
    batch's summed loss divided by that count."""
    model = train_tiny.tiny_model(head, seed=0)
    examples = train_tiny.tiny_dataset(head, 4)
    batch = {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
    scored = batch["labels"][:, 1:] if head == "causal-lm" else batch["labels"]
    num_scored = scored.ne(-100).sum()
    with torch.no_grad():
        mean_loss = model(**batch).loss
        loss_over_twice_as_many = model(**batch, num_items_in_batch=2 * num_scored).loss
    torch.testing.assert_close(loss_over_twice_as_many, mean_loss / 2, rtol=1e-6, atol=0)


def test_fsdp2_gathered_state_dict_round_trips(torchrun_results, torchrun_output):
    assert torchrun_results["world_size"] == NUM_PROCESSES
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(torchrun_output / "fsdp-model").eval()
    reference = shard_tiny.reference_training(STEPS, GLOBAL_BATCH, NUM_PROCESSES).state_dict()
    initial = train_tiny.tiny_model(shard_tiny.HEAD, seed=0).state_dict()
    trained = reloaded.state_dict()
    assert max((trained[name] - initial[name]).abs().max() for name in trained) > 1e-3, "FSDP did not train"
    for name, weight in reference.items():
        torch.testing.assert_close(trained[name], weight, rtol=0, atol=WEIGHT_ATOL, msg=lambda t: f"{name}: {t}")
    inputs = shard_tiny.eval_batch()
    with torch.no_grad():
        logits = reloaded(**inputs, decoder_input_ids=inputs["input_ids"]).logits
    torch.testing.assert_close(logits, torchrun_results["fsdp_logits"], rtol=0, atol=1e-5)


def test_tensor_parallel_matches_one_process(torchrun_results, torchrun_output):
    tensor_parallel = torchrun_results["tensor_parallel"]
    model = AutoModelForSeq2SeqLM.from_pretrained(torchrun_output / "fsdp-model").eval()
    sharded_weights = {
        name.removesuffix(".weight"): shapes for name, shapes in tensor_parallel["sharded_parameters"].items()
        if name.endswith(".weight")
    }
    expected = {
        re.sub(r"\.weight$", "", name) for name, _ in model.named_parameters()
        if re.search(r"_attn\.[qkvo]_proj\.weight$|ffn\.fc[12]\.weight$", name)
    }
    assert set(sharded_weights) == expected
    for name, (local_shape, full_shape) in sharded_weights.items():
        split_dim = 1 if name.endswith(("o_proj", "fc2")) else 0  # rowwise splits the input features
        # Rank 0 holds the first chunk (the larger one when the width, like intermediate_size 37, is uneven).
        assert local_shape[split_dim] == -(-full_shape[split_dim] // NUM_PROCESSES), name
        assert local_shape[1 - split_dim] == full_shape[1 - split_dim], name
    inputs = shard_tiny.eval_batch()
    with torch.no_grad():
        logits = model(**inputs, decoder_input_ids=inputs["input_ids"]).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(tensor_parallel["logits"], logits, rtol=0, atol=1e-5)
    assert torch.equal(tensor_parallel["generated"], generated)


TP_STYLES = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise",
             "fc1": "colwise", "fc2": "rowwise"}


@pytest.mark.parametrize("head", ["masked-lm", "causal-lm", "seq2seq"])
def test_tp_plan_covers_every_projection(head):
    """Each rule of the plan a model ends with names real Linear modules (none is dropped as naming nothing), and
    every attention and FFN projection has the style of its kind."""
    model = train_tiny.tiny_model(head, seed=0)
    modules = dict(model.named_modules())
    covered = set()
    for rule, style in model.tp_plan.items():
        pattern = re.escape(rule).replace(r"\*", r"\d+")
        matches = [name for name in modules if re.fullmatch(pattern, name)]
        assert matches, f"rule {rule} names no module"
        assert all(isinstance(modules[name], torch.nn.Linear) for name in matches), rule
        assert style == TP_STYLES[rule.rsplit(".", 1)[1]], rule
        covered.update(matches)
    projections = {name for name in modules if re.search(r"layers\.\d+\.(\w+_attn\.[qkvo]_proj|ffn\.fc[12])$", name)}
    assert covered == projections
    assert all(rule.startswith("model.") for rule in model.tp_plan)


def test_config_tp_plan_names_modules_of_the_bare_model():
    config = SelfAttnConfig(vocab_size=99, hidden_size=32, num_attention_heads=4, intermediate_size=37,
                            encoder_layers=1, decoder_layers=1, max_position_embeddings=16, decoder_start_token_id=2)
    model = modeling_selfattn.SelfAttnModel(config)
    names = {re.sub(r"\.\d+(?=\.|$)", ".*", name) for name, _ in model.named_modules()}
    assert set(SelfAttnConfig.base_model_tp_plan) <= names


@pytest.mark.parametrize(
    ("head", "auto_class"), [("masked-lm", AutoModelForMaskedLM), ("seq2seq", AutoModelForSeq2SeqLM)]
)
def test_device_map_auto_with_and_without_offload(head, auto_class, tmp_path):
    model = train_tiny.tiny_model(head, seed=0).eval()
    model.save_pretrained(tmp_path / "model")
    examples = train_tiny.tiny_dataset(head, 3)
    inputs = {key: torch.stack([example[key] for example in examples]) for key in ("input_ids", "attention_mask")}
    if head == "seq2seq":
        inputs["decoder_input_ids"] = inputs["input_ids"]
    with torch.no_grad():
        expected = model(**inputs).logits

    # On the GPU where there is one, on the CPU otherwise.
    placed = auto_class.from_pretrained(tmp_path / "model", device_map="auto")
    # Memory for 70% of the weights, from which accelerate keeps the largest layer's size in reserve: the layers
    # go to disk, whole.
    budget = sum(p.numel() * p.element_size() for p in model.parameters()) * 7 // 10
    offloaded = auto_class.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "offload"
    )
    assert set(offloaded.hf_device_map.values()) == {"cpu", "disk"}
    no_split = tuple(model._no_split_modules)
    for name in offloaded.hf_device_map:
        inside = [parent for parent in modules_above(model, name) if type(parent).__name__ in no_split]
        assert not inside, f"{name} splits a {type(inside[0]).__name__} across devices"
    for loaded in (placed, offloaded):
        with torch.no_grad():
            logits = loaded(**{key: value.to(loaded.device) for key, value in inputs.items()}).logits
        torch.testing.assert_close(logits.cpu(), expected, rtol=0, atol=1e-5)


def modules_above(model: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    """The modules strictly containing the module `name`."""
    parts = name.split(".") if name else []
    return [model.get_submodule(".".join(parts[:depth])) for depth in range(len(parts))]
