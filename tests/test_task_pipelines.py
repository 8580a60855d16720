"""The pipelines transformers 5 removed, provided by modeling_selfattn.pipelines."""

import random

import numpy as np
import pytest
import torch
from transformers import BertTokenizerFast, pipeline

from modeling_selfattn import SelfAttnConfig, SelfAttnForConditionalGeneration, SelfAttnForQuestionAnswering
from modeling_selfattn.pipelines import QuestionAnsweringPipeline

WORDS = "where is the river paris lies on seine city of a big old bridge".split()


@pytest.fixture(scope="module")
def tokenizer():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizerFast(vocab={word: index for index, word in enumerate(vocab)})


def config(tokenizer, **overrides):
    settings = dict(vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4, encoder_layers=2,
                    intermediate_size=64, max_position_embeddings=64)
    return SelfAttnConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def qa_model(tokenizer):
    torch.manual_seed(0)
    return SelfAttnForQuestionAnswering(config(tokenizer)).eval()


@pytest.fixture(scope="module")
def translator(tokenizer):
    torch.manual_seed(0)
    return SelfAttnForConditionalGeneration(
        config(tokenizer, decoder_layers=2, type_vocab_size=0, pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    ).eval()


def test_postprocess_picks_the_most_likely_valid_span(qa_model, tokenizer):
    reader = QuestionAnsweringPipeline(model=qa_model, tokenizer=tokenizer)
    context = "paris lies on the river seine"
    inputs = next(reader.preprocess({"question": "where is paris", "context": context}))
    length = inputs["input_ids"].shape[1]
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    first = tokens.index("river")
    start_logits = torch.full((1, length), -5.0)
    end_logits = torch.full((1, length), -5.0)
    start_logits[0, first], end_logits[0, first + 1] = 5.0, 5.0
    # An end before the start, and the question tokens, must never win even with higher logits.
    end_logits[0, first - 1] = 9.0
    start_logits[0, 1] = 9.0
    outputs = {"start_logits": start_logits, "end_logits": end_logits, **{k: inputs[k] for k in ("offsets", "in_context", "context")}}
    answer = reader.postprocess([outputs])
    assert answer["answer"] == "river seine" and context[answer["start"]:answer["end"]] == "river seine"


def test_question_answering_pipeline_end_to_end(qa_model, tokenizer):
    reader = pipeline("extractive-question-answering", model=qa_model, tokenizer=tokenizer)
    context = " ".join(["the old bridge of paris lies on the river seine"] * 6)
    answers = reader(question="where is paris", context=context, top_k=3, max_seq_len=24, doc_stride=8, max_answer_len=4)
    assert len(answers) == 3
    assert [a["score"] for a in answers] == sorted((a["score"] for a in answers), reverse=True)
    for answer in answers:
        assert context[answer["start"]:answer["end"]] == answer["answer"] and answer["answer"]
        assert len(tokenizer.tokenize(answer["answer"])) <= 4
    with pytest.raises(ValueError, match="non-empty"):
        reader(question="where", context="  ")


@pytest.mark.parametrize("top_k", [1, 2])
def test_question_answering_batches_give_what_one_context_at_a_time_gives(qa_model, tokenizer, top_k):
    reader = pipeline("extractive-question-answering", model=qa_model, tokenizer=tokenizer)
    words = random.Random(0)
    # 2 to 7 windows each: a batch of windows then holds the end of one context and the start of the next.
    contexts = [" ".join(words.choices(WORDS, k=length)) for length in (40, 75, 25, 60)]
    inputs = [{"question": "where is paris", "context": context} for context in contexts]
    options = dict(top_k=top_k, max_seq_len=24, doc_stride=8, max_answer_len=4)
    one_at_a_time = [reader(**question, **options) for question in inputs]
    for batch_size in (2, 4):
        batched = reader(inputs, batch_size=batch_size, **options)
        # The same spans; scores within float32 rounding (a window padded in a batch runs in products of other shapes).
        assert spans(batched) == spans(one_at_a_time)
        assert scores(batched) == pytest.approx(scores(one_at_a_time), rel=1e-5, abs=1e-7)


def answers_of(results) -> list[dict]:
    return [answer for result in results for answer in (result if isinstance(result, list) else [result])]


def spans(results) -> list[tuple]:
    return [(answer["start"], answer["end"], answer["answer"]) for answer in answers_of(results)]


def scores(results) -> list[float]:
    return [answer["score"] for answer in answers_of(results)]


def test_question_answering_takes_integers_of_any_type(qa_model, tokenizer):
    reader = pipeline("extractive-question-answering", model=qa_model, tokenizer=tokenizer)
    question = {"question": "where is paris", "context": "paris lies on the river seine"}
    assert reader(**question, top_k=np.int64(2)) == reader(**question, top_k=2)


@pytest.mark.parametrize(
    "call",
    [lambda reader: reader(question="where is paris"), lambda reader: reader({"question": "where is paris"}),
     lambda reader: reader(question="where is paris", context=None)],
    ids=["keyword", "dict", "none"],
)
def test_question_answering_without_a_context_says_so(qa_model, tokenizer, call):
    reader = pipeline("extractive-question-answering", model=qa_model, tokenizer=tokenizer)
    message = r"non-empty question and context, but got no context: call it as reader\(question="
    with pytest.raises(ValueError, match=message):
        call(reader)


def test_question_answering_without_any_input_says_how_to_call_it(qa_model, tokenizer):
    reader = pipeline("extractive-question-answering", model=qa_model, tokenizer=tokenizer)
    message = r"takes question=\.\.\. and context=\.\.\. \(or a dict with those keys\), got None"
    with pytest.raises(ValueError, match=message):
        reader()


# The question below is 15 tokens; with [CLS] and two [SEP] it fills 18 of the window's tokens.
LONG_QUESTION = "where is paris " * 5


@pytest.mark.parametrize(
    "options,message",
    [({"max_seq_len": 16}, r"^The question is 15 tokens long: with its 3 special tokens it leaves 0 context tokens in "
                           r"a window of 16 \(max_seq_len=16\)\. Give a shorter question, or a larger max_seq_len\.$"),
     ({"max_seq_len": 24, "doc_stride": 8}, r"leaves 6 context tokens in a window of 24 \(max_seq_len=24\), no more "
                                            r"than the 8 tokens that windows overlap by \(doc_stride=8\)\. Give a "
                                            r"doc_stride below 6, or a shorter question, or a larger max_seq_len\.$"),
     ({"max_seq_len": 24}, r"no more than the 12 tokens that windows overlap by \(the default doc_stride, "
                           r"min\(window // 2, 128\)\)"),
     ({"max_seq_len": 24, "doc_stride": 100}, r"no more than the 100 tokens that windows overlap by \(doc_stride=100\)")],
    ids=["question_longer_than_the_window", "no_room_beyond_the_stride", "no_room_beyond_the_default_stride",
         "no_room_beyond_a_stride_over_the_window"],
)
def test_question_answering_with_a_question_too_long_for_the_window_says_so(qa_model, tokenizer, options, message):
    reader = pipeline("extractive-question-answering", model=qa_model, tokenizer=tokenizer)
    context = " ".join(["the old bridge of paris lies on the river seine"] * 6)
    with pytest.raises(ValueError, match=message):
        reader(question=LONG_QUESTION, context=context, **options)


@pytest.mark.parametrize("name", ["topk", "handle_impossible_answer", "max_question_len", "not_an_option"])
def test_question_answering_refuses_an_unknown_parameter(qa_model, tokenizer, name):
    message = (
        rf"extractive-question-answering got unknown parameter\(s\) \['{name}'\]; it takes "
        r"\['doc_stride', 'max_answer_len', 'max_seq_len', 'top_k'\]"
    )
    reader = pipeline("extractive-question-answering", model=qa_model, tokenizer=tokenizer)
    with pytest.raises(TypeError, match=message):
        reader(question="where is paris", context="paris lies on the river seine", **{name: 1})
    with pytest.raises(TypeError, match=message):
        pipeline("extractive-question-answering", model=qa_model, tokenizer=tokenizer, **{name: 1})


@pytest.mark.parametrize(
    "name,value,requirement",
    [("top_k", 0, ">= 1"), ("top_k", True, ">= 1"), ("max_answer_len", 0, ">= 1"), ("max_seq_len", 0, ">= 1"),
     ("max_seq_len", 24.0, ">= 1"), ("doc_stride", -1, ">= 0")],
)
def test_question_answering_refuses_a_bad_value(qa_model, tokenizer, name, value, requirement):
    reader = pipeline("extractive-question-answering", model=qa_model, tokenizer=tokenizer)
    message = rf"^extractive-question-answering: {name} must be an integer {requirement}, got {value!r}\.$"
    with pytest.raises(ValueError, match=message):
        reader(question="where is paris", context="paris lies on the river seine", **{name: value})


@pytest.mark.parametrize("doc_stride", [4, 12, 16])
def test_question_answering_uses_a_given_doc_stride_as_it_is(qa_model, tokenizer, doc_stride):
    # A given overlap is the tokenizer's stride, also above max_seq_len // 2 (transformers' own pipeline capped only
    # its default): the windows are those the tokenizer makes with it.
    reader = pipeline("extractive-question-answering", model=qa_model, tokenizer=tokenizer)
    context = " ".join(["the old bridge of paris lies on the river seine"] * 6)
    question = "where is paris"
    windows = list(reader.preprocess({"question": question, "context": context}, max_seq_len=24, doc_stride=doc_stride))
    expected = tokenizer(question, context, truncation="only_second", max_length=24, stride=doc_stride,
                         return_overflowing_tokens=True)["input_ids"]
    assert [window["input_ids"][0].tolist() for window in windows] == expected


def test_question_answering_takes_a_doc_stride_of_zero(qa_model, tokenizer):
    # The question leaves 6 context tokens per window: room for a stride of 0, not for the default (max_seq_len // 2 = 12).
    reader = pipeline("extractive-question-answering", model=qa_model, tokenizer=tokenizer)
    context = " ".join(["the old bridge of paris lies on the river seine"] * 6)
    answer = reader(question=LONG_QUESTION, context=context, max_seq_len=24, doc_stride=0, max_answer_len=4)
    assert context[answer["start"]:answer["end"]] == answer["answer"]


def test_question_answering_default_doc_stride_follows_a_short_model_max_length(qa_model, tokenizer):
    # A window of 24 (model_max_length, below the default max_seq_len of 384) overlaps by 12 by default, not by the
    # 128 that max_seq_len=384 alone would give, which leaves no room for context in the window.
    short = BertTokenizerFast(vocab=tokenizer.get_vocab(), model_max_length=24)
    reader = pipeline("extractive-question-answering", model=qa_model, tokenizer=short)
    context = " ".join(["the old bridge of paris lies on the river seine"] * 6)
    windows = list(reader.preprocess({"question": "where is paris", "context": context}))
    expected = short("where is paris", context, truncation="only_second", max_length=24, stride=12,
                     return_overflowing_tokens=True)["input_ids"]
    assert [window["input_ids"][0].tolist() for window in windows] == expected
    answer = reader(question="where is paris", context=context)
    assert context[answer["start"]:answer["end"]] == answer["answer"]


def test_question_answering_top_k_beyond_the_valid_spans_gives_only_valid_spans(qa_model, tokenizer):
    reader = pipeline("extractive-question-answering", model=qa_model, tokenizer=tokenizer)
    context = "paris lies on the river seine"
    answers = reader(question="where is paris", context=context, top_k=100)
    # 6 context tokens give 6 * 7 / 2 spans (start <= end), all shorter than the default max_answer_len.
    assert len(answers) == 21 == len(set(spans(answers)))
    for answer in answers:
        assert 0 <= answer["start"] < answer["end"] and context[answer["start"]:answer["end"]] == answer["answer"]


def test_question_answering_refuses_a_context_without_tokens(qa_model, tokenizer):
    # Not blank, but every character is one the tokenizer drops: no span to answer with (it answered from the question).
    reader = pipeline("extractive-question-answering", model=qa_model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"^question-answering: the context '\\u200b' holds no token"):
        reader(question="where is paris", context="\u200b")


def test_question_answering_takes_lists_of_questions_and_contexts(qa_model, tokenizer):
    reader = pipeline("extractive-question-answering", model=qa_model, tokenizer=tokenizer)
    questions, contexts = ["where is paris", "where is the bridge"], ["paris lies on the seine", "a big old bridge"]
    one_at_a_time = [reader(question=q, context=c, top_k=2) for q, c in zip(questions, contexts)]
    assert reader(question=questions, context=contexts, top_k=2) == one_at_a_time
    assert reader([{"question": q, "context": c} for q, c in zip(questions, contexts)], top_k=2) == one_at_a_time
    # A single string goes with every item of the other list.
    assert reader(question=questions, context=contexts[0]) == [reader(question=q, context=contexts[0]) for q in questions]
    assert reader(question=questions[0], context=contexts) == [reader(question=questions[0], context=c) for c in contexts]
    with pytest.raises(ValueError, match=r"^question-answering got 2 questions and 1 contexts: give one context per"):
        reader(question=questions, context=contexts[:1])


@pytest.mark.parametrize(
    "task,key", [("seq2seq-generation", "generated_text"), ("seq2seq-translation", "translation_text"), ("seq2seq-summarization", "summary_text")]
)
def test_seq2seq_pipelines_match_generate(translator, tokenizer, task, key):
    runner = pipeline(task, model=translator, tokenizer=tokenizer)
    text = "where is the old bridge"
    result = runner(text, max_new_tokens=6, num_beams=2, skip_special_tokens=False)
    encoded = tokenizer(text, return_tensors="pt", return_token_type_ids=False)
    output_ids = translator.generate(**encoded, max_new_tokens=6, num_beams=2)
    assert result == [{key: tokenizer.decode(output_ids[0], skip_special_tokens=False).strip()}]
    assert len(runner(["paris", "the river"], max_new_tokens=3)) == 2


def test_seq2seq_pipeline_batches_give_each_input_its_own_sequences(translator, tokenizer):
    runner = pipeline("seq2seq-translation", model=translator, tokenizer=tokenizer)
    texts = ["where is the old bridge", "paris", "of the old bridge", "the river seine lies on a big city"]
    # Without suppressing [CLS], the decoder's start token, this random model repeats it whatever the input, which
    # would hide an input given another's sequences.
    options = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, suppress_tokens=[2])
    one_at_a_time = [runner(text, **options) for text in texts]
    assert [len(sequences) for sequences in one_at_a_time] == [2] * 4 and one_at_a_time[0] != one_at_a_time[1]
    for batch_size in (2, 4):
        assert runner(texts, batch_size=batch_size, **options) == one_at_a_time


def test_seq2seq_pipeline_uses_the_generation_parameters_it_was_built_with(translator, tokenizer):
    built_with = pipeline("seq2seq-translation", model=translator, tokenizer=tokenizer, max_new_tokens=2, num_beams=2)
    plain = pipeline("seq2seq-translation", model=translator, tokenizer=tokenizer)
    text = "where is the old bridge"
    expected = plain(text, max_new_tokens=2, num_beams=2, skip_special_tokens=False)
    assert built_with(text, skip_special_tokens=False) == expected


def test_seq2seq_pipeline_uses_the_assistant_model_it_was_built_with(translator, tokenizer):
    assistant = SelfAttnForConditionalGeneration(translator.config).eval()
    calls = []
    assistant.register_forward_hook(lambda *_: calls.append(1))
    runner = pipeline("seq2seq-translation", model=translator, tokenizer=tokenizer, assistant_model=assistant)
    text = "where is the old bridge"
    # Greedy assisted decoding yields what greedy decoding does, whatever the assistant proposes.
    expected = pipeline("seq2seq-translation", model=translator, tokenizer=tokenizer)(text, max_new_tokens=4)
    assert runner(text, max_new_tokens=4) == expected and calls


@pytest.mark.parametrize(
    "name,value,requirement",
    [("skip_special_tokens", "no", "True or False"), ("truncation", 0, "True, False or a truncation strategy")],
)
def test_seq2seq_pipeline_refuses_a_bad_value(translator, tokenizer, name, value, requirement):
    runner = pipeline("seq2seq-translation", model=translator, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=rf"^seq2seq-translation: {name} must be {requirement}"):
        runner("where is the old bridge", max_new_tokens=2, **{name: value})
