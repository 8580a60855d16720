"""Prune the attention heads of a fine-tuned classifier by importance (Michel et al. 2019) or at random, and measure
what is left: accuracy and speed on the validation set, without retraining (and, with --fine_tune_steps, after a
short fine-tune).

    python examples/prune_heads.py --model outputs/sst2-minilm \
        --train_file ../shared/data/sst2/train.tsv --validation_file ../shared/data/sst2/dev.tsv

Head importance is computed once, on the unpruned model, over --importance_samples training sentences drawn at
random (--seed) from the rows after the first --skip_train_rows (those the classifier was fine-tuned on). For each
fraction of the heads, the least important ones are pruned, and, for comparison, as many heads drawn at random
(one draw per --random_seeds entry). Speed is sentences per second over the whole validation set in batches of
--batch_size: after the accuracy pass, --speed_runs rounds each time every model in turn, and a model's figure is its
median over the rounds. The files are `text<TAB>label` lines (GLUE's
layout, with its header). Writes results.json and head_importance.png to --output_dir and prints a Markdown table.
An existing, non-empty --output_dir is refused before any work, unless --overwrite_output_dir replaces an earlier
run's output (those two files and nothing else), as the other example scripts do (common.check_output_path).
"""

import argparse
import copy
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from common import check_output_path, written_beside
from transformers import AutoTokenizer

from modeling_selfattn import SelfAttnForSequenceClassification
from modeling_selfattn.head_importance import head_importance, least_important_heads
from modeling_selfattn.output_folder import RunOutputs
from modeling_selfattn.visualize import plot_head_importance, read_labelled_texts


FINE_TUNE_LEARNING_RATE = 2e-5
RESULTS_FILE, IMPORTANCE_PLOT = "results.json", "head_importance.png"
OUTPUTS = RunOutputs("prune_heads.py run", markers=(RESULTS_FILE, IMPORTANCE_PLOT))


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/sst2-minilm", help="a fine-tuned selfattn sequence classifier")
    parser.add_argument("--train_file", required=True, help="labelled sentences for the importance (text<TAB>label)")
    parser.add_argument("--validation_file", required=True, help="labelled sentences for accuracy and speed")
    parser.add_argument("--output_dir", default="outputs/prune_heads")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help=f"replace an existing --output_dir holding an earlier run's output ({RESULTS_FILE}, {IMPORTANCE_PLOT}) "
        "and nothing else, once this run has finished",
    )
    parser.add_argument("--fractions", default="0,0.25,0.5", help="shares of all heads to prune, comma-separated")
    parser.add_argument("--random_seeds", default="0,1,2", help="one random pruning per seed, comma-separated")
    parser.add_argument("--importance_samples", type=int, default=512)
    parser.add_argument("--skip_train_rows", type=int, default=8000, help="training rows left out of the sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the importance sample and of fine-tuning")
    parser.add_argument("--importance_batch_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=64, help="evaluation and speed batch size")
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--speed_runs", type=int, default=3)
    parser.add_argument(
        "--fine_tune_steps", type=int, default=0, help="after pruning, train this many steps (0: no retraining)"
    )
    parser.add_argument(
        "--fine_tune_learning_rate",
        type=float,
        help=f"learning rate of --fine_tune_steps (default {FINE_TUNE_LEARNING_RATE:g}; only with --fine_tune_steps)",
    )
    args = parser.parse_args(argv)
    try:
        args.fractions = [float(value) for value in args.fractions.split(",")]
        args.random_seeds = [int(value) for value in args.random_seeds.split(",") if value.strip()]
    except ValueError as error:
        parser.error(f"--fractions takes numbers and --random_seeds integers, comma-separated ({error})")
    if any(not 0 <= fraction <= 1 for fraction in args.fractions):
        parser.error(f"--fractions must lie within [0, 1], got {args.fractions}")
    for name in ("importance_samples", "importance_batch_size", "batch_size", "max_seq_length", "speed_runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    # A negative count would slice the file from its end, or train no steps while results.json records them.
    for name in ("skip_train_rows", "fine_tune_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be at least 0, got {getattr(args, name)}")
    if args.fine_tune_learning_rate is None:
        args.fine_tune_learning_rate = FINE_TUNE_LEARNING_RATE
    elif not args.fine_tune_steps:
        parser.error(
            "--fine_tune_learning_rate applies only to the fine-tune after pruning, which --fine_tune_steps 0 (the "
            "default) skips; add --fine_tune_steps N, or leave out --fine_tune_learning_rate."
        )
    elif not (args.fine_tune_learning_rate > 0 and math.isfinite(args.fine_tune_learning_rate)):  # nan too
        parser.error(
            f"--fine_tune_learning_rate must be a number above 0, got {args.fine_tune_learning_rate}; e.g. "
            f"--fine_tune_learning_rate {FINE_TUNE_LEARNING_RATE:g}."
        )
    try:
        check_output_path(
            args.output_dir,
            OUTPUTS,
            args.overwrite_output_dir,
            inputs={"--model": args.model, "--train_file": args.train_file, "--validation_file": args.validation_file},
        )
    except ValueError as error:
        parser.error(str(error))
    return args


def batches(pairs, tokenizer, batch_size: int, max_length: int) -> list[dict]:
    out = []
    for start in range(0, len(pairs), batch_size):
        texts, labels = zip(*pairs[start : start + batch_size])
        encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({**encoded, "labels": torch.tensor(labels)})
    return out


@torch.no_grad()
def accuracy(model, evaluation: list[dict]) -> float:
    correct = total = 0
    for batch in evaluation:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        correct += int((model(**inputs).logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    return correct / total


@torch.no_grad()
def sentences_per_second(model, evaluation: list[dict]) -> float:
    """One timed pass over the evaluation batches."""
    inputs = [{key: value for key, value in batch.items() if key != "labels"} for batch in evaluation]
    start = time.perf_counter()
    for batch in inputs:
        model(**batch)
    return sum(len(batch["input_ids"]) for batch in inputs) / (time.perf_counter() - start)


def fine_tune(model, training: list[dict], steps: int, learning_rate: float, seed: int) -> None:
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)  # made after pruning: the new parameters
    for step in range(steps):
        loss = model(**training[step % len(training)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def random_heads(num_layers: int, num_heads: int, count: int, seed: int) -> dict[str, list[int]]:
    everything = [(layer, head) for layer in range(num_layers) for head in range(num_heads)]
    chosen: dict[str, list[int]] = {}
    for layer, head in sorted(random.Random(seed).sample(everything, count)):
        chosen.setdefault(f"encoder.{layer}", []).append(head)
    return chosen


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    with written_beside(Path(args.output_dir), args.overwrite_output_dir, "--output_dir") as output_dir:
        return prune_and_measure(args, output_dir)


def prune_and_measure(args: argparse.Namespace, output_dir: Path) -> dict:
    """The run, writing its files to `output_dir`."""
    model = SelfAttnForSequenceClassification.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = model.config
    if config.pruned_heads:
        raise SystemExit(f"error: {args.model} is already pruned ({config.pruned_heads}); start from a whole model.")
    train_pairs = read_labelled_texts(args.train_file, config)[args.skip_train_rows :]
    if len(train_pairs) < args.importance_samples:
        raise SystemExit(
            f"error: {args.train_file} has {len(train_pairs)} rows after --skip_train_rows {args.skip_train_rows}, "
            f"fewer than --importance_samples {args.importance_samples}."
        )
    sample = random.Random(args.seed).sample(train_pairs, args.importance_samples)
    importance_batches = batches(sample, tokenizer, args.importance_batch_size, args.max_seq_length)
    evaluation = batches(
        read_labelled_texts(args.validation_file, config), tokenizer, args.batch_size, args.max_seq_length
    )

    start = time.perf_counter()
    importance = head_importance(model, importance_batches)
    importance_seconds = time.perf_counter() - start
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_head_importance(importance, output_dir / IMPORTANCE_PLOT, f"head importance ({len(sample)} sentences)")

    num_layers, num_heads = importance.shape
    total_heads = num_layers * num_heads
    plans = []  # (method, fraction, plan, seed)
    for fraction in args.fractions:
        count = round(fraction * total_heads)
        if count == 0:
            plans.append(("none", fraction, {}, None))
            continue
        plans.append(("importance", fraction, least_important_heads(importance, count), None))
        plans.extend(
            ("random", fraction, random_heads(num_layers, num_heads, count, seed), seed) for seed in args.random_seeds
        )

    rows, models = [], []
    for method, fraction, plan, seed in plans:
        pruned = copy.deepcopy(model)
        pruned.prune_heads(plan)
        if args.fine_tune_steps:
            fine_tune(pruned, importance_batches, args.fine_tune_steps, args.fine_tune_learning_rate, args.seed)
        rows.append({
            "method": method,
            "fraction": fraction,
            "heads_pruned": sum(len(heads) for heads in plan.values()),
            "heads_total": total_heads,
            "seed": seed,
            "layers_without_heads": sum(len(heads) == num_heads for heads in plan.values()),
            "accuracy": accuracy(pruned, evaluation),  # also the untimed warm-up pass
            "parameters": sum(parameter.numel() for parameter in pruned.parameters()),
            "pruned_heads": pruned.config.pruned_heads,
        })
        models.append(pruned)
        print(f"{method:>10} {fraction:4.0%} seed={seed}: accuracy {rows[-1]['accuracy']:.4f}", flush=True)
    # Timed in rounds that take every model in turn, so that a change in the machine's load over the run falls on all
    # of them alike; each model's figure is its median over the rounds.
    timings = [[] for _ in models]
    for _ in range(args.speed_runs):
        for index, pruned in enumerate(models):
            timings[index].append(sentences_per_second(pruned, evaluation))
    for row, speeds in zip(rows, timings):
        row["sentences_per_second"] = statistics.median(speeds)
        row["sentences_per_second_runs"] = speeds

    results = {
        "model": str(args.model),
        "importance": importance.tolist(),
        "importance_sentences": len(sample),
        "importance_seconds": importance_seconds,
        "validation_sentences": sum(len(batch["labels"]) for batch in evaluation),
        "fine_tune_steps": args.fine_tune_steps,
        "rows": rows,
    }
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=1))
    print(markdown_table(rows))
    return results


def markdown_table(rows: list[dict]) -> str:
    """One line per fraction and method; random prunings give the mean accuracy over their seeds (and the range) and
    the median speed."""
    lines = [
        "| heads pruned | method | dev accuracy | sentences/s | layers left without heads |",
        "|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["fraction"], row["method"]), []).append(row)
    for (fraction, method), group in groups.items():
        accuracies = [row["accuracy"] for row in group]
        if len(group) > 1:
            accuracy_text = f"{statistics.mean(accuracies):.4f} ({min(accuracies):.4f} to {max(accuracies):.4f})"
            method = f"{method}, {len(group)} seeds"
        else:
            accuracy_text = f"{accuracies[0]:.4f}"
        speed = statistics.median(row["sentences_per_second"] for row in group)
        empty_layers = ", ".join(str(row["layers_without_heads"]) for row in group)
        lines.append(
            f"| {fraction:.0%} ({group[0]['heads_pruned']} of {group[0]['heads_total']}) | {method} | "
            f"{accuracy_text} | {speed:.0f} | {empty_layers} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
