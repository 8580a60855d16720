"""Fine-tune a selfattn token classifier (named entities, part-of-speech tags) and report seqeval's entity F1.

    python examples/run_ner.py --model_name_or_path PATH_TO_all-MiniLM-L6-v2 \
        --train_file train.jsonl --validation_file dev.jsonl --do_train --do_eval --output_dir out/wnut17

Each example is a list of words (--tokens_column) with one tag per word (--tags_column; names such as B-person,
or ClassLabel ids). Words are split into word pieces; the first piece of each word carries the word's tag and
the other pieces are not scored (-100), so predictions are compared word by word. The evaluation scores whole
sentences: words that --max_seq_length cuts off, and words the tokenizer makes no piece of (a lone emoji variation
selector), count as predicted "O", so that their entities count as missed rather than left out; a warning counts
them.
"""

from dataclasses import dataclass, field

import numpy as np
from common import (
    LabelEncoder,
    length_limit,
    load_model,
    load_tokenizer,
    load_whole_splits,
    logger,
    require_columns,
    run_script,
    sequence_length,
    sized_splits,
    tokenize_splits,
    train_evaluate_save,
)
from task_metrics import entity_metrics
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

from modeling_selfattn import SelfAttnForTokenClassification

NOT_SCORED = -100
# seqeval's tag of a word outside any entity: the prediction of a word the model never saw.
OUTSIDE = "O"
# Kept with each tokenized sentence to score it whole and say what the model did not see; not model inputs.
SCORED_WORDS, CUT_WORDS, PIECELESS_WORDS = "scored_words", "cut_words", "pieceless_words"
SENTENCE_COLUMNS = [SCORED_WORDS, CUT_WORDS, PIECELESS_WORDS]


@dataclass
class TokenClassificationArguments:
    tokens_column: str = field(default="tokens", metadata={"help": "Column holding each example's list of words."})
    tags_column: str = field(default="ner_tags", metadata={"help": "Column holding one tag per word."})


def first_pieces(word_ids: list[int | None]) -> list[int | None]:
    """For each token, the index of the word it starts, or None (special tokens and later pieces of a word)."""
    firsts, previous_word = [], None
    for word_id in word_ids:
        firsts.append(None if word_id == previous_word else word_id)
        previous_word = word_id
    return firsts


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """One label per token: the word's label on its first piece, NOT_SCORED on special tokens and later pieces."""
    return [NOT_SCORED if word is None else word_labels[word] for word in first_pieces(word_ids)]


def sentence_features(batch, tokenizer, max_length: int, tokens_column: str, word_labels) -> dict:
    """The tokenized sentences, cut at `max_length` tokens, with their token labels (`word_labels(index)`: the
    label ids of the batch's index-th sentence), the word of each scored token (SCORED_WORDS), the number of words
    cut off (CUT_WORDS: words whose first piece lies past the cut) and of words without a piece (PIECELESS_WORDS)."""
    encoded = tokenizer(
        batch[tokens_column],
        is_split_into_words=True,
        truncation=True,
        max_length=max_length,
        return_overflowing_tokens=True,  # the cut-off rest, to count the words in it
    )
    sentence_of = encoded.pop("overflow_to_sample_mapping")
    kept_row, cut_off = {}, {sentence: set() for sentence in range(len(batch[tokens_column]))}
    for row, sentence in enumerate(sentence_of):
        if sentence in kept_row:
            cut_off[sentence].update(word for word in encoded.word_ids(row) if word is not None)
        else:
            kept_row[sentence] = row
    rows = [kept_row[sentence] for sentence in range(len(kept_row))]
    features = {name: [values[row] for row in rows] for name, values in encoded.items()}
    for column in ("labels", *SENTENCE_COLUMNS):
        features[column] = []
    for sentence, row in enumerate(rows):
        word_ids = encoded.word_ids(row)
        kept = set(word_ids) - {None}
        features["labels"].append(align_labels(word_ids, word_labels(sentence)))
        features[SCORED_WORDS].append([word for word in first_pieces(word_ids) if word is not None])
        features[CUT_WORDS].append(len(cut_off[sentence] - kept))
        features[PIECELESS_WORDS].append(len(batch[tokens_column][sentence]) - len(kept | cut_off[sentence]))
    return features


def whole_sentence_tags(predicted_ids, label_ids, scored_words: list[int], word_count: int, names: list[str]):
    """The predicted tag of every word of a sentence: the model's at the word's first piece (the tokens whose
    label is scored, in order), OUTSIDE for a word it never saw (cut off, or without a piece)."""
    tags = [OUTSIDE] * word_count
    for word, tag_id in zip(scored_words, predicted_ids[label_ids != NOT_SCORED], strict=True):
        tags[word] = names[tag_id]
    return tags


def warn_of_unseen_words(tokenized, raw, tokens_column: str, max_length: int, limit: int) -> None:
    """Says, for each split, how many sentences and words the model does not see (cut off by --max_seq_length, or
    without a piece), what that does, and the fix."""
    consequences = {
        "train": "the model is not trained on them",
        "validation": f'the evaluation scores them as predicted "{OUTSIDE}", so their entities count as missed',
    }
    if max_length < limit:
        fix = f"give a larger --max_seq_length (the model reads up to {limit} tokens)"
    else:
        fix = f"split the longer sentences in the data: the model reads no more than {limit} tokens"
    for split, dataset in tokenized.items():
        words = sum(len(tokens) for tokens in raw[split][tokens_column])
        cut, pieceless = dataset[CUT_WORDS], dataset[PIECELESS_WORDS]
        if any(cut):
            logger.warning(
                "--max_seq_length %d cuts %d of the %d %s sentences short, leaving out %d of the split's %d words: %s. "
                "To keep them, %s.",
                max_length, sum(count > 0 for count in cut), len(cut), split, sum(cut), words, consequences[split], fix,
            )  # fmt: skip
        if any(pieceless):
            logger.warning(
                "%d of the %d %s words (in %d sentences) give the tokenizer no piece at all (a lone emoji variation "
                "selector does): %s.",
                sum(pieceless), words, split, sum(count > 0 for count in pieceless), consequences[split],
            )  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    return run_script(run, TokenClassificationArguments, argv)


def run(model_args, data_args, task_args, training_args) -> dict:
    whole = load_whole_splits(data_args, training_args)
    for split in whole.values():
        require_columns(split, [task_args.tokens_column, task_args.tags_column], "--tokens_column / --tags_column")
    reference_split = whole["train"] if "train" in whole else whole["validation"]
    # The classes are every tag of the data, not only those of the sentences --max_*_samples keeps.
    tags = LabelEncoder(
        getattr(reference_split.features[task_args.tags_column], "feature", None),
        [tag for split in whole.values() for sentence_tags in split[task_args.tags_column] for tag in sentence_tags],
        model_args,
        "--tags_column",
        sequence_head=False,
        fine_tuning=training_args.do_train,
    )
    raw = sized_splits(whole, data_args)
    tokenizer = load_tokenizer(model_args)
    if not tokenizer.is_fast:
        raise ValueError("run_ner.py maps word pieces back to words with a fast tokenizer's word_ids(); use one.")
    max_length = sequence_length(data_args, tokenizer, model_args)

    def tokenize(batch):
        return sentence_features(
            batch, tokenizer, max_length, task_args.tokens_column,
            lambda index: tags.encode(batch[task_args.tags_column][index]),
        )  # fmt: skip

    tokenized = tokenize_splits(raw, training_args, data_args, tokenize)
    warn_of_unseen_words(tokenized, raw, task_args.tokens_column, max_length, length_limit(tokenizer, model_args)[0])

    def build_model():
        return load_model(
            model_args,
            SelfAttnForTokenClassification,
            AutoModelForTokenClassification,
            tokenizer,
            **tags.config_fields(),
        )

    if "validation" in raw:
        gold_tags = [
            [tags.names[index] for index in tags.encode(sentence_tags)]
            for sentence_tags in raw["validation"][task_args.tags_column]
        ]
        scored_words = tokenized["validation"][SCORED_WORDS]

    def compute_metrics(prediction):
        """seqeval over whole sentences, every word of the data scored."""
        predicted_ids = np.argmax(prediction.predictions, axis=-1)
        predicted_tags = [
            whole_sentence_tags(predicted_row, label_row, words, len(gold), tags.names)
            for predicted_row, label_row, words, gold in zip(
                predicted_ids, prediction.label_ids, scored_words, gold_tags, strict=True
            )
        ]
        return entity_metrics(predicted_tags, gold_tags)

    return train_evaluate_save(
        model_args=model_args,
        training_args=training_args,
        model=build_model(),
        build_model=build_model,
        lora_task_type="TOKEN_CLS",
        data=tokenized.remove_columns(SENTENCE_COLUMNS),
        tokenizer=tokenizer,
        data_collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=compute_metrics,
    )


if __name__ == "__main__":
    main()
