"""Train tiny selfattn models with `Trainer` on random data: the training run that the distributed, resume and
mixed-precision tests launch (under `accelerate launch` or `torchrun`, as a plain process, or imported).

    python tests/scripts/train_tiny.py --heads token-classification masked-lm --output-dir OUT --per-device-batch 4

writes, from the main process, OUT/results.json ({head: {"losses": loss logged at each step, "world_size", ...}})
and OUT/<head>/model.safetensors (the final weights). The data, the model initialisation and the seed are fixed,
so two runs that see the same global batches must log the same losses.

Token-level heads get labels in which the number of scored tokens differs from example to example, so a loss
averaged per process instead of over the whole global batch, or scaled by the number of processes, shows in the
losses. `--pause-after-checkpoint` and `--training-args` serve the resume test.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

import modeling_selfattn
from modeling_selfattn import SelfAttnConfig

SEQUENCE_LENGTH = 8
NUM_CHOICES = 3
NUM_LABELS = 3
VOCAB_SIZE = 99
PAD_TOKEN_ID = 0

# head -> (model class, encoder_layers, decoder_layers)
HEADS = {
    "sequence-classification": ("SelfAttnForSequenceClassification", 2, 0),
    "multiple-choice": ("SelfAttnForMultipleChoice", 2, 0),
    "question-answering": ("SelfAttnForQuestionAnswering", 2, 0),
    "token-classification": ("SelfAttnForTokenClassification", 2, 0),
    "masked-lm": ("SelfAttnForMaskedLM", 2, 0),
    "causal-lm": ("SelfAttnForCausalLM", 0, 2),
    "seq2seq": ("SelfAttnForConditionalGeneration", 2, 2),
}


def tiny_config(head: str, dropout: float = 0.0) -> SelfAttnConfig:
    _, encoder_layers, decoder_layers = HEADS[head]
    return SelfAttnConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=37,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        hidden_dropout_prob=dropout,
        attention_dropout=dropout,
        max_position_embeddings=16,
        num_labels=NUM_LABELS,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
    )


def tiny_model(head: str, seed: int, dropout: float = 0.0):
    set_seed(seed)
    return getattr(modeling_selfattn, HEADS[head][0])(tiny_config(head, dropout))


def padded_ids(generator: torch.Generator, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with a random number (1 to SEQUENCE_LENGTH) of real tokens per row, then padding."""
    ids = torch.randint(3, VOCAB_SIZE, (*shape, SEQUENCE_LENGTH), generator=generator)
    lengths = torch.randint(1, SEQUENCE_LENGTH + 1, shape, generator=generator)
    mask = (torch.arange(SEQUENCE_LENGTH) < lengths.unsqueeze(-1)).long()
    return ids.masked_fill(mask == 0, PAD_TOKEN_ID), mask


def tiny_dataset(head: str, num_examples: int, seed: int = 1234) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(num_examples):
        if head == "multiple-choice":
            ids, mask = padded_ids(generator, (NUM_CHOICES,))
        else:
            ids, mask = padded_ids(generator, ())
        example = {"input_ids": ids, "attention_mask": mask}
        if head in ("sequence-classification", "multiple-choice"):
            num_classes = NUM_CHOICES if head == "multiple-choice" else NUM_LABELS
            example["labels"] = torch.randint(num_classes, (), generator=generator)
        elif head == "question-answering":
            start = torch.randint(int(mask.sum()), (), generator=generator)
            example["start_positions"] = start
            example["end_positions"] = torch.randint(int(start), int(mask.sum()), (), generator=generator)
        elif head == "token-classification":
            example["labels"] = torch.randint(NUM_LABELS, ids.shape, generator=generator).masked_fill(mask == 0, -100)
        elif head == "masked-lm":
            scored = (torch.rand(ids.shape, generator=generator) < 0.4) & (mask == 1)
            scored[0] = True  # at least one scored token per example
            example["labels"] = ids.masked_fill(~scored, -100)
        elif head == "causal-lm":
            example["labels"] = ids.masked_fill(mask == 0, -100)
        elif head == "seq2seq":
            target, target_mask = padded_ids(generator, ())
            example["labels"] = target.masked_fill(target_mask == 0, -100)
        examples.append(example)
    return examples


class RecordLoss(TrainerCallback):
    """Keeps the loss Trainer logs at each step (gathered over the processes and averaged)."""

    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


class PauseAfterCheckpoint(TrainerCallback):
    """Once the checkpoint of `step` is written, announce it on stdout and wait forever: the resume test kills the
    process there (SIGKILL), in the middle of training."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            print(f"CHECKPOINT SAVED {state.global_step}", flush=True)
            while True:
                time.sleep(60)


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def training_arguments(output_dir: Path, per_device_batch: int, max_steps: int, seed: int, **overrides):
    """Plain SGD at a constant rate without clipping: a loss or gradient scaled wrongly changes every later step
    (Adam would normalise a constant scale away, clipping would hide it)."""
    fields = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=per_device_batch,
        per_device_eval_batch_size=per_device_batch,
        max_steps=max_steps,
        optim="sgd",
        learning_rate=0.2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        ddp_find_unused_parameters=False,
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    fields.update(overrides)
    return TrainingArguments(**fields)


def train(
    head: str,
    output_dir: Path,
    per_device_batch: int,
    max_steps: int,
    seed: int = 0,
    dropout: float = 0.0,
    num_examples: int | None = None,
    evaluate: bool = False,
    resume_from_checkpoint: str | None = None,
    callbacks: tuple[TrainerCallback, ...] = (),
    **training_overrides,
) -> dict:
    """Train one head on `num_examples` examples (default: one global batch per step), evaluate on 16 others if
    asked. Returns {"losses", "metrics", "world_size", "accepts_loss_kwargs", "trainer"}."""
    args = training_arguments(output_dir, per_device_batch, max_steps, seed, **training_overrides)
    recorder = RecordLoss()
    trainer = Trainer(
        model=tiny_model(head, seed, dropout),
        args=args,
        train_dataset=tiny_dataset(head, num_examples or per_device_batch * args.world_size * max_steps),
        eval_dataset=tiny_dataset(head, 16, seed=4321) if evaluate else None,
        compute_metrics=accuracy if evaluate else None,
        callbacks=[recorder, *callbacks],
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return {
        "losses": recorder.losses,
        "metrics": trainer.evaluate() if evaluate else {},
        "world_size": args.world_size,
        "accepts_loss_kwargs": trainer.model_accepts_loss_kwargs,
        "trainer": trainer,
    }


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", choices=sorted(HEADS), required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--num-examples", type=int, help="default: one global batch per step")
    parser.add_argument("--evaluate", action="store_true", help="evaluate after training (loss and accuracy)")
    parser.add_argument("--training-args", type=json.loads, default={}, help="JSON of TrainingArguments overrides")
    parser.add_argument("--pause-after-checkpoint", type=int, help="announce the checkpoint of this step, then wait")
    args = parser.parse_args(argv)

    callbacks = (PauseAfterCheckpoint(args.pause_after_checkpoint),) if args.pause_after_checkpoint else ()
    results = {}
    for head in args.heads:
        run = train(
            head, args.output_dir / head, args.per_device_batch, args.max_steps, args.seed, args.dropout,
            args.num_examples, args.evaluate, callbacks=callbacks, **args.training_args,
        )
        trainer = run.pop("trainer")
        if trainer.is_world_process_zero():
            results[head] = run
            save_file(weights_of(trainer.model), str(args.output_dir / head / "model.safetensors"))
    if results:
        results_file = args.output_dir / "results.json"
        results_file.write_text(json.dumps(results, indent=1))
        print(f"wrote {results_file}")


if __name__ == "__main__":
    main()
