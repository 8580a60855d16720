"""Sharded training and inference of a tiny selfattn encoder-decoder over two CPU processes (gloo), as on two GPUs:

    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 tests/scripts/shard_tiny.py --output-dir OUT

1. DDP with Trainer for the heads named by --ddp-heads (as tests/scripts/train_tiny.py; results in OUT/ddp).
2. FSDP2: `fully_shard` on every encoder and decoder layer, then on the whole model; SGD steps in which each
   process trains on its half of the global batch; the logits of a fixed batch; the full state dict gathered on
   rank 0 (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`), loaded into a fresh model and written
   with `save_pretrained` to OUT/fsdp-model.
3. Tensor parallelism: OUT/fsdp-model loaded on both processes with
   `from_pretrained(distributed_config=DistributedConfig(tp_plan="auto"))` (the config's `base_model_tp_plan`);
   the logits of the same batch and a greedy generation.

Rank 0 writes OUT/results.pt.
"""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForSeq2SeqLM
from transformers.distributed import DistributedConfig

import train_tiny

HEAD = "seq2seq"
LEARNING_RATE = 0.2


def global_batches(num_steps: int, global_batch: int) -> list[dict[str, torch.Tensor]]:
    examples = train_tiny.tiny_dataset(HEAD, num_steps * global_batch)
    return [
        {key: torch.stack([example[key] for example in examples[start : start + global_batch]]) for key in examples[0]}
        for start in range(0, len(examples), global_batch)
    ]


def part_of(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    return {key: value.chunk(world_size)[rank] for key, value in batch.items()}


def eval_batch() -> dict[str, torch.Tensor]:
    examples = train_tiny.tiny_dataset(HEAD, 4, seed=99)
    return {key: torch.stack([example[key] for example in examples]) for key in ("input_ids", "attention_mask")}


def sgd_step(model: torch.nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter -= LEARNING_RATE * parameter.grad
            parameter.grad = None


def reference_training(num_steps: int, global_batch: int, world_size: int) -> torch.nn.Module:
    """What FSDP must compute, in one process: the gradient of the mean of the per-process losses."""
    model = train_tiny.tiny_model(HEAD, seed=0)
    model.train()
    for batch in global_batches(num_steps, global_batch):
        losses = [model(**part_of(batch, rank, world_size)).loss for rank in range(world_size)]
        sgd_step(model, torch.stack(losses).mean())
    return model


def fsdp_training(output_dir: Path, num_steps: int, global_batch: int) -> torch.Tensor:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = train_tiny.tiny_model(HEAD, seed=0)
    for layer in [*model.model.encoder.layers, *model.model.decoder.layers]:
        fully_shard(layer)
    fully_shard(model)
    model.train()
    for batch in global_batches(num_steps, global_batch):
        sgd_step(model, model(**part_of(batch, rank, world_size)).loss)

    model.eval()
    with torch.no_grad():
        logits = model(**eval_batch(), decoder_input_ids=eval_batch()["input_ids"]).logits
    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        fresh = train_tiny.tiny_model(HEAD, seed=1)
        fresh.load_state_dict(full_state)
        fresh.save_pretrained(output_dir / "fsdp-model")
    dist.barrier()
    return logits


def tensor_parallel_inference(model_dir: Path) -> dict:
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, distributed_config=DistributedConfig(tp_plan="auto"))
    model.eval()
    inputs = eval_batch()
    with torch.no_grad():
        logits = model(**inputs, decoder_input_ids=inputs["input_ids"]).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    local_shapes = {
        name: (tuple(parameter.to_local().shape), tuple(parameter.shape))
        for name, parameter in model.named_parameters()
        if isinstance(parameter, DTensor)
    }
    return {"logits": logits, "generated": generated, "sharded_parameters": local_shapes}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--ddp-heads", nargs="*", choices=sorted(train_tiny.HEADS), default=[])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=8)
    args = parser.parse_args(argv)

    if args.ddp_heads:
        train_tiny.main(
            ["--heads", *args.ddp_heads, "--output-dir", str(args.output_dir / "ddp"),
             "--per-device-batch", str(args.global_batch // int(os.environ["WORLD_SIZE"]))]
        )
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    fsdp_logits = fsdp_training(args.output_dir, args.steps, args.global_batch)
    tensor_parallel = tensor_parallel_inference(args.output_dir / "fsdp-model")
    if dist.get_rank() == 0:
        results = {"world_size": dist.get_world_size(), "fsdp_logits": fsdp_logits, "tensor_parallel": tensor_parallel}
        torch.save(results, args.output_dir / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
