"""Fine-tune a selfattn text classifier (single sentences or sentence pairs) and report accuracy and F1, or a
regressor of scores and report mean squared error and Pearson's r.

    python examples/run_classification.py --model_name_or_path PATH_TO_all-MiniLM-L6-v2 \
        --train_file train.tsv --validation_file dev.tsv --do_train --do_eval --output_dir out/sst2

The data needs a text column (--text_column; default: sentence or text), optionally a second one for pairs
(--text_pair_column), and a label column (--label_column) of class names or integer ids (classes in numeric order),
or of scores (a float column, e.g. STS-B's similarity), which the model regresses (num_labels 1, problem_type
"regression"; evaluation reports mse and Pearson's r). `python examples/run_classification.py --help` lists every
option, the Trainer's included.
"""

from dataclasses import dataclass, field

import numpy as np
from common import (
    LabelEncoder,
    load_model,
    load_tokenizer,
    load_whole_splits,
    pick_column,
    require_columns,
    run_script,
    sequence_length,
    sized_splits,
    tokenize_splits,
    train_evaluate_save,
)
from task_metrics import classification_metrics, regression_metrics
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from modeling_selfattn import SelfAttnForSequenceClassification


@dataclass
class ClassificationArguments:
    text_column: str | None = field(default=None, metadata={"help": "Text column (default: sentence or text)."})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Second text column, for sentence-pair tasks (entailment, paraphrase)."}
    )
    label_column: str = field(
        default="label",
        metadata={
            "help": "Label column: class names or integer ids, or scores (a float column) to regress with one output."
        },
    )


def main(argv: list[str] | None = None) -> dict:
    return run_script(run, ClassificationArguments, argv)


def run(model_args, data_args, task_args, training_args) -> dict:
    whole = load_whole_splits(data_args, training_args)
    reference_split = whole["train"] if "train" in whole else whole["validation"]
    text_column = pick_column(reference_split, task_args.text_column, ("sentence", "text"), "--text_column")
    columns = [text_column, task_args.label_column] + (
        [task_args.text_pair_column] if task_args.text_pair_column else []
    )
    for split in whole.values():
        require_columns(split, columns, "--text_column / --text_pair_column / --label_column")

    # The classes are every label of the data, not only those of the examples --max_*_samples keeps.
    labels = LabelEncoder(
        reference_split.features[task_args.label_column],
        [value for split in whole.values() for value in split[task_args.label_column]],
        model_args,
        "--label_column",
        sequence_head=True,
        fine_tuning=training_args.do_train,
    )
    raw = sized_splits(whole, data_args)
    tokenizer = load_tokenizer(model_args)
    max_length = sequence_length(data_args, tokenizer, model_args)

    def tokenize(batch):
        pairs = (batch[task_args.text_pair_column],) if task_args.text_pair_column else ()
        encoded = tokenizer(batch[text_column], *pairs, truncation=True, max_length=max_length)
        encoded["labels"] = labels.encode(batch[task_args.label_column])
        return encoded

    tokenized = tokenize_splits(raw, training_args, data_args, tokenize)

    def build_model():
        return load_model(
            model_args,
            SelfAttnForSequenceClassification,
            AutoModelForSequenceClassification,
            tokenizer,
            **labels.config_fields(),
        )

    def compute_metrics(prediction):
        if labels.is_regression:
            return regression_metrics(prediction.predictions[:, 0], prediction.label_ids)
        return classification_metrics(
            np.argmax(prediction.predictions, axis=-1), prediction.label_ids, len(labels.names)
        )

    return train_evaluate_save(
        model_args=model_args,
        training_args=training_args,
        model=build_model(),
        build_model=build_model,
        lora_task_type="SEQ_CLS",
        data=tokenized,
        tokenizer=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )


if __name__ == "__main__":
    main()
