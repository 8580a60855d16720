"""Fine-tune a selfattn extractive question-answering model and report SQuAD v1.1 exact match and F1.

    python examples/run_qa.py --model_name_or_path PATH_TO_all-MiniLM-L6-v2 --train_file squad_train.jsonl \
        --validation_file squad_dev.jsonl --do_train --do_eval --output_dir out/squad

The data follows the SQuAD schema: id, question, context and answers = {"text": [...], "answer_start": [...]}
(character offsets into the context). A question and its context longer than --max_seq_length (default 384, capped
at what the model reads) is cut into overlapping windows of the context, each with the question (--doc_stride
tokens shared between neighbours; default 128, or less where the windows are short: half of what a window holds
of the context after the longest question); each window is trained to point at the answer, or at its first
token when the answer is not inside it. At evaluation the best-scoring span over all windows of a question,
mapped back to characters with the tokenizer's offsets, is its predicted answer.
"""

import collections
from dataclasses import dataclass, field

import numpy as np
from common import (
    DataArguments,
    load_model,
    load_raw_datasets,
    load_tokenizer,
    logger,
    require_at_least,
    require_columns,
    run_script,
    sequence_length,
    tokenize_splits,
    train_evaluate_save,
)
from task_metrics import squad_metrics
from transformers import AutoModelForQuestionAnswering, DataCollatorWithPadding

from modeling_selfattn import SelfAttnForQuestionAnswering

COLUMNS = ("id", "question", "context", "answers")
# Kept with each evaluation window to map predictions back to text; not model inputs.
WINDOW_COLUMNS = ["example_id", "offset_mapping"]
# transformers' run_qa.py defaults: a window of 384 tokens, neighbours sharing 128.
DEFAULT_MAX_SEQ_LENGTH, DEFAULT_DOC_STRIDE = 384, 128


@dataclass
class QuestionAnsweringDataArguments(DataArguments):
    max_seq_length: int = field(
        default=DEFAULT_MAX_SEQ_LENGTH,
        metadata={"help": "Tokens of a window: the question, a stretch of the context and the special tokens."},
    )


@dataclass
class QuestionAnsweringArguments:
    doc_stride: int | None = field(
        default=None,
        metadata={
            "help": f"Tokens shared by neighbouring windows of a long context (default {DEFAULT_DOC_STRIDE}, or half "
            "of what a window holds of the context after the longest question where that is less)."
        },
    )
    n_best_size: int = field(
        default=20, metadata={"help": "Start and end candidates per window considered when picking the answer."}
    )
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer predicted, in tokens."})

    def __post_init__(self):
        require_at_least(self, 0, "doc_stride")
        require_at_least(self, 1, "n_best_size", "max_answer_length")


def window_features(batch, tokenizer, max_length: int, doc_stride: int) -> dict:
    """Tokenized (question, context window) pairs with the answer's token span (start_positions, end_positions;
    0, 0 when the window does not hold the whole answer), the question id, and the character offsets of the
    context tokens (None for question and special tokens)."""
    encoded = tokenizer(
        [question.lstrip() for question in batch["question"]],
        batch["context"],
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    window_to_example = encoded.pop("overflow_to_sample_mapping")
    encoded["start_positions"], encoded["end_positions"], encoded["example_id"] = [], [], []
    for window, offsets in enumerate(encoded["offset_mapping"]):
        example = window_to_example[window]
        sequence_ids = encoded.sequence_ids(window)
        context_tokens = [index for index, sequence in enumerate(sequence_ids) if sequence == 1]
        answers = batch["answers"][example]
        start = end = 0
        if answers["answer_start"] and context_tokens:
            answer_start = answers["answer_start"][0]
            answer_end = answer_start + len(answers["text"][0])
            first, last = context_tokens[0], context_tokens[-1]
            if offsets[first][0] <= answer_start and offsets[last][1] >= answer_end:
                start = next(index for index in context_tokens if offsets[index][1] > answer_start)
                end = next(index for index in reversed(context_tokens) if offsets[index][0] < answer_end)
        encoded["start_positions"].append(start)
        encoded["end_positions"].append(end)
        encoded["example_id"].append(batch["id"][example])
        encoded["offset_mapping"][window] = [
            offset if sequence == 1 else None for offset, sequence in zip(offsets, sequence_ids)
        ]
    return encoded


def best_answers(examples, windows, start_logits, end_logits, n_best_size: int, max_answer_length: int) -> dict:
    """{question id: answer text}: the span with the highest start + end logit over all of a question's windows,
    among spans inside the context, ending after they start and at most max_answer_length tokens long."""
    windows_of = collections.defaultdict(list)
    for window, example_id in enumerate(windows["example_id"]):
        windows_of[example_id].append(window)
    all_offsets = windows["offset_mapping"]
    answers = {}
    for example_id, context in zip(examples["id"], examples["context"]):
        best_score, best_text = -np.inf, ""
        for window in windows_of[example_id]:
            offsets, starts, ends = all_offsets[window], start_logits[window], end_logits[window]
            # Logits of a batch are padded to its longest window; positions past this window's end are skipped.
            candidates_start = np.argsort(starts[: len(offsets)])[-n_best_size:]
            candidates_end = np.argsort(ends[: len(offsets)])[-n_best_size:]
            for start in candidates_start:
                for end in candidates_end:
                    if offsets[start] is None or offsets[end] is None:
                        continue
                    if end < start or end - start + 1 > max_answer_length:
                        continue
                    score = starts[start] + ends[end]
                    if score > best_score:
                        best_score, best_text = score, context[offsets[start][0] : offsets[end][1]]
        answers[example_id] = best_text
    return answers


def window_stride(raw, tokenizer, max_length: int, doc_stride: int | None) -> int:
    """--doc_stride, checked (before tokenizing, where the tokenizer would fail with a bare panic) against the
    context tokens a window holds: --max_seq_length less the longest question and the special tokens. A window
    must hold more context tokens than it shares with the next; by default it shares DEFAULT_DOC_STRIDE, or half
    of what it holds where that is less."""
    questions = [(example_id, question.lstrip()) for split in raw.values()
                 for example_id, question in zip(split["id"], split["question"])]  # fmt: skip
    lengths = tokenizer([question for _, question in questions], add_special_tokens=False)["input_ids"]
    longest = max(range(len(questions)), key=lambda index: len(lengths[index]))
    question_tokens, special_tokens = len(lengths[longest]), tokenizer.num_special_tokens_to_add(pair=True)
    room = max_length - question_tokens - special_tokens
    longest_question = f"the longest question ({question_tokens} tokens, id {questions[longest][0]})"
    if room < 1:
        raise ValueError(
            f"--max_seq_length {max_length} leaves no room for the context after {longest_question} and "
            f"{special_tokens} special tokens: give a --max_seq_length above {question_tokens + special_tokens}, or "
            "leave out the longest questions."
        )
    if doc_stride is None:
        stride = min(DEFAULT_DOC_STRIDE, room // 2)
        if stride < DEFAULT_DOC_STRIDE:
            logger.info("--doc_stride %d: half of the %d context tokens a window holds.", stride, room)
        return stride
    if doc_stride >= room:
        raise ValueError(
            f"--doc_stride {doc_stride} must be less than the context tokens a window holds: --max_seq_length "
            f"{max_length} leaves {room} after {longest_question} and {special_tokens} special tokens. Give a "
            f"--doc_stride below {room}, or a larger --max_seq_length."
        )
    if doc_stride >= max_length // 2:
        raise ValueError(
            f"--doc_stride {doc_stride} must be below half of --max_seq_length {max_length}: give a --doc_stride "
            f"below {max_length // 2}, or a larger --max_seq_length."
        )
    return doc_stride


def main(argv: list[str] | None = None) -> dict:
    return run_script(run, QuestionAnsweringArguments, argv, data_arguments=QuestionAnsweringDataArguments)


def run(model_args, data_args, task_args, training_args) -> dict:
    raw = load_raw_datasets(data_args, training_args)
    for split in raw.values():
        require_columns(split, list(COLUMNS), "the SQuAD schema (id, question, context, answers)")
    tokenizer = load_tokenizer(model_args)
    if not tokenizer.is_fast or tokenizer.padding_side != "right":
        raise ValueError("run_qa.py needs a fast tokenizer (for offsets) that pads on the right.")
    max_length = sequence_length(data_args, tokenizer, model_args)
    doc_stride = window_stride(raw, tokenizer, max_length, task_args.doc_stride)

    windows = tokenize_splits(
        raw, training_args, data_args, lambda batch: window_features(batch, tokenizer, max_length, doc_stride)
    )

    def build_model():
        return load_model(model_args, SelfAttnForQuestionAnswering, AutoModelForQuestionAnswering, tokenizer)

    def compute_metrics(prediction):
        start_logits, end_logits = prediction.predictions
        predicted = best_answers(
            raw["validation"],
            windows["validation"],
            start_logits,
            end_logits,
            task_args.n_best_size,
            task_args.max_answer_length,
        )
        gold = {
            example_id: answers["text"]
            for example_id, answers in zip(raw["validation"]["id"], raw["validation"]["answers"])
        }
        return squad_metrics(predicted, gold)

    return train_evaluate_save(
        model_args=model_args,
        training_args=training_args,
        model=build_model(),
        build_model=build_model,
        lora_task_type="QUESTION_ANS",
        data=windows.remove_columns(WINDOW_COLUMNS),
        tokenizer=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        examples=raw,
        rows_are="windows",
    )


if __name__ == "__main__":
    main()
