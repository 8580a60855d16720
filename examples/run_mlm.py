"""Masked-language-model pretraining of a selfattn encoder, from scratch (--config_name) or continued from
pretrained weights (--model_name_or_path); reports the evaluation perplexity.

    python examples/run_mlm.py --model_name_or_path PATH_TO_all-MiniLM-L6-v2 --train_file abstracts.jsonl \
        --validation_split_percentage 10 --text_column document --do_train --do_eval --output_dir out/mlm

Texts are tokenized, concatenated and cut into blocks of --max_seq_length tokens; in each batch
--mlm_probability of the tokens are chosen for prediction (80 % of them replaced by the mask token, 10 % by a
random token, 10 % left as they are). Perplexity is exp(evaluation loss) over the chosen tokens.
"""

import math
from dataclasses import dataclass, field
from itertools import chain

from common import (
    load_model,
    load_raw_datasets,
    load_tokenizer,
    pick_column,
    run_script,
    sequence_length,
    tokenize_splits,
    train_evaluate_save,
)
from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling

from modeling_selfattn import SelfAttnForMaskedLM


@dataclass
class MaskedLMArguments:
    text_column: str | None = field(
        default=None, metadata={"help": "Text column (default: text, sentence or document)."}
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of tokens chosen for prediction."})

    def __post_init__(self):
        if not 0 < self.mlm_probability <= 1:
            raise ValueError(
                f"--mlm_probability is a share of the tokens: give one above 0 and at most 1, got "
                f"{self.mlm_probability}."
            )


def blocks_of(batch: dict, block_length: int) -> dict:
    """The token lists of a batch of texts concatenated and cut into blocks of `block_length` (the remainder
    shorter than a block is dropped)."""
    joined = {name: list(chain.from_iterable(values)) for name, values in batch.items()}
    usable = len(joined["input_ids"]) // block_length * block_length
    return {
        name: [values[start : start + block_length] for start in range(0, usable, block_length)]
        for name, values in joined.items()
    }


def main(argv: list[str] | None = None) -> dict:
    return run_script(run, MaskedLMArguments, argv)


def run(model_args, data_args, task_args, training_args) -> dict:
    raw = load_raw_datasets(data_args, training_args)
    reference_split = raw["train"] if "train" in raw else raw["validation"]
    text_column = pick_column(reference_split, task_args.text_column, ("text", "sentence", "document"), "--text_column")
    tokenizer = load_tokenizer(model_args)
    if tokenizer.mask_token is None:
        raise ValueError("Masked-LM training needs a tokenizer with a mask token (e.g. BERT's [MASK]).")
    block_length = sequence_length(data_args, tokenizer, model_args)

    def tokenize(batch):
        return tokenizer(batch[text_column], return_special_tokens_mask=True)

    tokenized = tokenize_splits(raw, training_args, data_args, tokenize)
    with training_args.main_process_first(desc="grouping texts into blocks"):
        blocks = tokenized.map(
            lambda batch: blocks_of(batch, block_length),
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            desc=f"cutting into blocks of {block_length}",
        )
    empty = [split for split, dataset in blocks.items() if len(dataset) == 0]
    if empty:
        raise ValueError(
            f"The {empty} data holds fewer than --max_seq_length={block_length} tokens in all: give more text or a "
            "smaller --max_seq_length."
        )

    def build_model():
        return load_model(model_args, SelfAttnForMaskedLM, AutoModelForMaskedLM, tokenizer)

    return train_evaluate_save(
        model_args=model_args,
        training_args=training_args,
        model=build_model(),
        build_model=build_model,
        lora_task_type=None,
        data=blocks,
        tokenizer=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=task_args.mlm_probability),
        derived_eval_metrics=lambda metrics: {"eval_perplexity": math.exp(metrics["eval_loss"])},
        examples=raw,
        rows_are="blocks",
    )


if __name__ == "__main__":
    main()
