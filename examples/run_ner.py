"""Fine-tune a selfattn token classifier (named entities, part-of-speech tags) and report seqeval's entity F1.

    python examples/run_ner.py --model_name_or_path PATH_TO_all-MiniLM-L6-v2 \
        --train_file train.jsonl --validation_file dev.jsonl --do_train --do_eval --output_dir out/wnut17

Each example is a list of words (--tokens_column) with one tag per word (--tags_column; names such as B-person,
or ClassLabel ids). Words are split into word pieces; the first piece of each word carries the word's tag and
the other pieces are not scored (-100), so predictions are compared word by word.
"""

from dataclasses import dataclass, field

import numpy as np
from common import (
    LabelEncoder,
    load_model,
    load_raw_datasets,
    load_tokenizer,
    require_columns,
    run_script,
    sequence_length,
    tokenize_splits,
    train_evaluate_save,
)
from task_metrics import entity_metrics
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

from modeling_selfattn import SelfAttnForTokenClassification

NOT_SCORED = -100


@dataclass
class TokenClassificationArguments:
    tokens_column: str = field(default="tokens", metadata={"help": "Column holding each example's list of words."})
    tags_column: str = field(default="ner_tags", metadata={"help": "Column holding one tag per word."})


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """One label per token: the word's label on its first piece, NOT_SCORED on special tokens and later pieces."""
    labels, previous_word = [], None
    for word_id in word_ids:
        labels.append(NOT_SCORED if word_id is None or word_id == previous_word else word_labels[word_id])
        previous_word = word_id
    return labels


def main(argv: list[str] | None = None) -> dict:
    return run_script(run, TokenClassificationArguments, argv)


def run(model_args, data_args, task_args, training_args) -> dict:
    raw = load_raw_datasets(data_args, training_args)
    for split in raw.values():
        require_columns(split, [task_args.tokens_column, task_args.tags_column], "--tokens_column / --tags_column")
    reference_split = raw["train"] if "train" in raw else raw["validation"]
    tags = LabelEncoder(
        getattr(reference_split.features[task_args.tags_column], "feature", None),
        [tag for split in raw.values() for example_tags in split[task_args.tags_column] for tag in example_tags],
        model_args,
        "--tags_column",
        sequence_head=False,
    )
    tokenizer = load_tokenizer(model_args)
    if not tokenizer.is_fast:
        raise ValueError("run_ner.py maps word pieces back to words with a fast tokenizer's word_ids(); use one.")
    max_length = sequence_length(data_args, tokenizer, model_args)

    def tokenize(batch):
        encoded = tokenizer(
            batch[task_args.tokens_column], is_split_into_words=True, truncation=True, max_length=max_length
        )
        labels = []
        for index, word_tags in enumerate(batch[task_args.tags_column]):
            labels.append(align_labels(encoded.word_ids(index), tags.encode(word_tags)))
        encoded["labels"] = labels
        return encoded

    tokenized = tokenize_splits(raw, training_args, data_args, tokenize)

    def build_model():
        return load_model(
            model_args,
            SelfAttnForTokenClassification,
            AutoModelForTokenClassification,
            tokenizer,
            **tags.config_fields(),
        )

    def compute_metrics(prediction):
        predicted_ids = np.argmax(prediction.predictions, axis=-1)
        predicted_tags, gold_tags = [], []
        for predicted_row, gold_row in zip(predicted_ids, prediction.label_ids):
            scored = gold_row != NOT_SCORED
            predicted_tags.append([tags.names[index] for index in predicted_row[scored]])
            gold_tags.append([tags.names[index] for index in gold_row[scored]])
        return entity_metrics(predicted_tags, gold_tags)

    return train_evaluate_save(
        model_args=model_args,
        training_args=training_args,
        model=build_model(),
        build_model=build_model,
        lora_task_type="TOKEN_CLS",
        data=tokenized,
        tokenizer=tokenizer,
        data_collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=compute_metrics,
    )


if __name__ == "__main__":
    main()
