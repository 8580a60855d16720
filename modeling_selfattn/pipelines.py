"""Pipelines for tasks that transformers 5 removed (it now refuses `question-answering`,
`text2text-generation`, `translation` and `summarization` by name): extractive question answering over a
QA head and generation with an encoder-decoder. Registered on import under names transformers does not
reserve, so they work with `pipeline(...)` for selfattn and any model of the matching Auto class:

    pipeline("extractive-question-answering", model=folder)(question=..., context=...)
    pipeline("seq2seq-translation", model=folder)("a sentence", num_beams=4)

The classes can also be built directly: QuestionAnsweringPipeline(model=model, tokenizer=tokenizer).
"""

import torch
from transformers import AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY, SUPPORTED_TASKS
from transformers.pipelines.base import ChunkPipeline

from .argument_values import is_integer


def integer_from(low: int) -> tuple:
    def test(value) -> bool:
        return is_integer(value) and value >= low

    return test, f"an integer >= {low}"


# Checks of a parameter's value: (test, what the value must be).
AT_LEAST_ONE, AT_LEAST_ZERO = integer_from(1), integer_from(0)
BOOLEAN = (lambda value: isinstance(value, bool), "True or False")
TRUNCATION = (lambda value: isinstance(value, (bool, str)), "True, False or a truncation strategy such as 'only_first'")


def sort_parameters(
    pipeline: Pipeline, parameters: dict, preprocess: dict, postprocess: dict, passes_on_the_rest: bool = False
) -> tuple[dict, dict, dict]:
    """The (preprocess, forward, postprocess) parameters of a call or of the pipeline's construction, each checked
    by its stage's {name: check}; None stands for not given, as in transformers' pipelines. Pipeline hands over
    every keyword it does not use itself, so an unknown one is an error here: it would otherwise be dropped
    without a word. A pipeline that `passes_on_the_rest` gives them to its forward stage instead."""
    task = pipeline.task or type(pipeline).__name__
    checks = {**preprocess, **postprocess}
    unknown = sorted(name for name in parameters if name not in checks)
    if unknown and not passes_on_the_rest:
        raise TypeError(f"{task} got unknown parameter(s) {unknown}; it takes {sorted(checks)}. Check the spelling.")
    for name, (test, requirement) in checks.items():
        if parameters.get(name) is not None and not test(parameters[name]):
            raise ValueError(f"{task}: {name} must be {requirement}, got {parameters[name]!r}.")
    given = {name: value for name, value in parameters.items() if value is not None}
    return (
        {name: value for name, value in given.items() if name in preprocess},
        {name: value for name, value in given.items() if name in unknown},
        {name: value for name, value in given.items() if name in postprocess},
    )


class QuestionAnsweringPipeline(ChunkPipeline):
    """Finds the answer span of a question in a context. Long contexts are read in overlapping windows
    (`doc_stride`); the best span over all windows wins. Returns {"answer", "score", "start", "end"} with
    character offsets into the context, or a list of up to `top_k` of them (fewer where the context has fewer spans).
    Lists of questions and contexts give a list of results, one per pair.

    A ChunkPipeline, as transformers' own was: each window is an item of its own, so that with `batch_size` the
    batches hold windows (of one context or several) and every context gets its own windows back."""

    def _sanitize_parameters(self, **parameters):
        return sort_parameters(
            self,
            parameters,
            preprocess={"max_seq_len": AT_LEAST_ONE, "doc_stride": AT_LEAST_ZERO},
            postprocess={"top_k": AT_LEAST_ONE, "max_answer_len": AT_LEAST_ONE},
        )

    def __call__(self, question=None, context=None, **kwargs):
        # As in transformers' own pipeline: lists pair up, and a lone string goes with each item of the other list.
        lists = [len(value) for value in (question, context) if isinstance(value, (list, tuple))]
        if isinstance(context, (list, tuple)) or (lists and context is not None):
            if len(set(lists)) > 1:
                raise ValueError(
                    f"question-answering got {lists[0]} questions and {lists[1]} contexts: give one context per "
                    "question, or a single string as the question or the context to pair with every item of the other."
                )
            questions, contexts = (
                value if isinstance(value, (list, tuple)) else [value] * lists[0] for value in (question, context)
            )
            return super().__call__([{"question": q, "context": c} for q, c in zip(questions, contexts)], **kwargs)
        if isinstance(question, str) or context is not None:
            return super().__call__({"question": question, "context": context}, **kwargs)
        return super().__call__(question if question is not None else kwargs.pop("inputs", None), **kwargs)

    def preprocess(self, inputs, max_seq_len=384, doc_stride=None):
        if not isinstance(inputs, dict):
            raise ValueError(
                f"question-answering takes question=... and context=... (or a dict with those keys), got {inputs!r}."
            )
        missing = [name for name in ("question", "context") if not isinstance(inputs.get(name), str)]
        if missing:
            raise ValueError(
                f"question-answering needs a non-empty question and context, but got no {' and no '.join(missing)}: "
                "call it as reader(question='...', context='the text to find the answer in')."
            )
        question, context = inputs["question"], inputs["context"]
        if not question.strip() or not context.strip():
            raise ValueError("question-answering needs a non-empty question and context.")
        if not self.tokenizer.is_fast:
            raise ValueError("question-answering needs a fast tokenizer (it maps tokens back to characters).")
        max_length = min(max_seq_len, self.tokenizer.model_max_length)
        # Only the default overlap follows the window actually used (as transformers' own pipeline did, which
        # clamped max_seq_len to model_max_length first); a given one is used as is.
        stride = min(max_length // 2, 128) if doc_stride is None else doc_stride
        self._check_question_fits(question, max_seq_len, doc_stride, max_length, stride)
        encoded = self.tokenizer(
            question,
            context,
            truncation="only_second",
            max_length=max_length,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=True,
            return_tensors="pt",
        )
        if 1 not in encoded.sequence_ids(0):
            raise ValueError(
                f"question-answering: the context {context!r} holds no token (the tokenizer drops all its characters), "
                "so no span of it can answer; give a context with text in it."
            )
        names = [name for name in self.tokenizer.model_input_names if name in encoded]
        windows = len(encoded["input_ids"])
        for i in range(windows):
            yield {
                **{name: encoded[name][i : i + 1] for name in names},
                "offsets": encoded["offset_mapping"][i : i + 1],
                "in_context": torch.tensor([[sequence == 1 for sequence in encoded.sequence_ids(i)]]),
                "context": context,
                "is_last": i == windows - 1,
            }

    def _check_question_fits(self, question: str, max_seq_len: int, doc_stride: int, max_length: int, stride: int):
        """Every window repeats the whole question, so the question must leave room for context tokens, and
        for more of them than the windows overlap by; the tokenizer would otherwise fail (or panic) deep
        inside its truncation."""
        question_tokens = len(self.tokenizer(question, add_special_tokens=False)["input_ids"])
        special_tokens = self.tokenizer.num_special_tokens_to_add(pair=True)
        room = max_length - question_tokens - special_tokens
        if max_length == max_seq_len:
            window, longer = f"max_seq_len={max_seq_len}", ", or a larger max_seq_len"
        else:  # a larger max_seq_len would not help
            window, longer = f"the tokenizer's model_max_length, below max_seq_len={max_seq_len}", ""
        problem = (
            f"The question is {question_tokens} tokens long: with its {special_tokens} special tokens it leaves "
            f"{max(room, 0)} context tokens in a window of {max_length} ({window})"
        )
        if room < 1:
            raise ValueError(f"{problem}. Give a shorter question{longer}.")
        if stride >= room:
            overlap = f"doc_stride={doc_stride}" if doc_stride is not None else "the default doc_stride, min(window // 2, 128)"
            raise ValueError(
                f"{problem}, no more than the {stride} tokens that windows overlap by ({overlap}). Give a doc_stride "
                f"below {room}, or a shorter question{longer}."
            )

    def _forward(self, inputs):
        model_inputs = {name: inputs[name] for name in self.tokenizer.model_input_names if name in inputs}
        outputs = self.model(**model_inputs)
        return {
            "start_logits": outputs.start_logits,
            "end_logits": outputs.end_logits,
            **{name: inputs[name] for name in ("offsets", "in_context", "context", "is_last")},
        }

    def postprocess(self, windows, top_k=1, max_answer_len=30):
        # A context's windows share one length: the tokenizer pads them to the longest, and a context of several
        # windows fills the window size, which batching (of one call, so one window size) never pads beyond.
        names = ("start_logits", "end_logits", "in_context", "offsets")
        outputs = {name: torch.cat([window[name] for window in windows]) for name in names}
        mask = outputs["in_context"]
        start = outputs["start_logits"].float().masked_fill(~mask, float("-inf")).softmax(-1)
        end = outputs["end_logits"].float().masked_fill(~mask, float("-inf")).softmax(-1)
        # score[w, i, j] = p(start = i) * p(end = j), for spans i <= j shorter than max_answer_len
        scores = start[:, :, None] * end[:, None, :]
        length = scores.shape[-1]
        allowed = torch.ones(length, length, dtype=torch.bool).triu().tril(max_answer_len - 1)
        # Only spans within the context are answers: with fewer of them than top_k, fewer answers come back (as from
        # transformers' own pipeline) rather than spans over the question, padding or ending before they start.
        valid = allowed & mask[:, :, None] & mask[:, None, :]
        scores = scores.masked_fill(~valid, float("-inf"))
        best = torch.topk(scores.flatten(), k=min(top_k, int(valid.sum())))
        answers = []
        for score, index in zip(best.values.tolist(), best.indices.tolist()):
            window, rest = divmod(index, length * length)
            first, last = divmod(rest, length)
            start_char = int(outputs["offsets"][window, first, 0])
            end_char = int(outputs["offsets"][window, last, 1])
            answers.append(
                {
                    "score": score,
                    "start": start_char,
                    "end": end_char,
                    "answer": windows[0]["context"][start_char:end_char],
                }
            )
        return answers[0] if top_k == 1 else answers


class Text2TextGenerationPipeline(Pipeline):
    """Encodes the text, runs `generate()` with the model's generation config (overridable when the pipeline is
    built and per call), and decodes. The result key follows the task: generated_text, translation_text or
    summary_text."""

    _pipeline_calls_generate = True
    result_key = "generated_text"

    def _sanitize_parameters(self, **parameters):
        # The other parameters are generate()'s, which refuses those it does not know.
        preprocess, generate_kwargs, postprocess = sort_parameters(
            self,
            parameters,
            preprocess={"truncation": TRUNCATION},
            postprocess={"skip_special_tokens": BOOLEAN},
            passes_on_the_rest=True,
        )
        # Pipeline.__init__ sets the assistant aside too: generate() gets it unless the call passes its own.
        if getattr(self, "assistant_model", None) is not None:
            generate_kwargs = {"assistant_model": self.assistant_model, **generate_kwargs}
        if getattr(self, "assistant_tokenizer", None) is not None:
            assistant = {"assistant_tokenizer": self.assistant_tokenizer, "tokenizer": self.tokenizer}
            generate_kwargs = {**assistant, **generate_kwargs}
        return preprocess, generate_kwargs, postprocess

    def preprocess(self, text, truncation=True):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{self.task or 'text2text-generation'} needs a non-empty string, got {text!r}.")
        return self.tokenizer(text, truncation=truncation, return_tensors="pt")

    def _forward(self, model_inputs, **generate_kwargs):
        model_inputs = {name: value for name, value in model_inputs.items() if name != "token_type_ids"}
        # Adds the generation parameters the pipeline was built with, which Pipeline.__init__ set aside.
        output_ids = self.model.generate(**model_inputs, **self._prepare_generate_kwargs(generate_kwargs))
        # generate() returns num_return_sequences rows per input, one after another; the pipeline splits a batch's
        # outputs along the first axis, one item per input, so each input's rows go on an axis of their own.
        inputs = len(model_inputs["input_ids"])
        return {"output_ids": output_ids.reshape(inputs, len(output_ids) // inputs, -1)}

    def postprocess(self, outputs, skip_special_tokens=True):
        texts = self.tokenizer.batch_decode(outputs["output_ids"][0], skip_special_tokens=skip_special_tokens)
        return [{self.result_key: text.strip()} for text in texts]


class TranslationPipeline(Text2TextGenerationPipeline):
    result_key = "translation_text"


class SummarizationPipeline(Text2TextGenerationPipeline):
    result_key = "summary_text"


TASKS = {
    "extractive-question-answering": (QuestionAnsweringPipeline, AutoModelForQuestionAnswering),
    "seq2seq-generation": (Text2TextGenerationPipeline, AutoModelForSeq2SeqLM),
    "seq2seq-translation": (TranslationPipeline, AutoModelForSeq2SeqLM),
    "seq2seq-summarization": (SummarizationPipeline, AutoModelForSeq2SeqLM),
}


def register_pipelines() -> None:
    for task, (pipeline_class, auto_class) in TASKS.items():
        if task not in SUPPORTED_TASKS:
            PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=pipeline_class, pt_model=auto_class, type="text")
