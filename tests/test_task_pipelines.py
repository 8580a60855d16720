"""The pipelines transformers 5 removed, provided by modeling_selfattn.pipelines."""

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


def test_postprocess_picks_the_most_likely_valid_span(qa_model, tokenizer):
    reader = QuestionAnsweringPipeline(model=qa_model, tokenizer=tokenizer)
    context = "paris lies on the river seine"
    inputs = reader.preprocess({"question": "where is paris", "context": context})
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
    answer = reader.postprocess(outputs)
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


@pytest.mark.parametrize(
    "task,key", [("seq2seq-generation", "generated_text"), ("seq2seq-translation", "translation_text"), ("seq2seq-summarization", "summary_text")]
)
def test_seq2seq_pipelines_match_generate(tokenizer, task, key):
    torch.manual_seed(0)
    model = SelfAttnForConditionalGeneration(
        config(tokenizer, decoder_layers=2, type_vocab_size=0, pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    ).eval()
    runner = pipeline(task, model=model, tokenizer=tokenizer)
    text = "where is the old bridge"
    result = runner(text, max_new_tokens=6, num_beams=2, skip_special_tokens=False)
    encoded = tokenizer(text, return_tensors="pt", return_token_type_ids=False)
    expected = tokenizer.decode(model.generate(**encoded, max_new_tokens=6, num_beams=2)[0], skip_special_tokens=False)
    assert result == [{key: expected.strip()}]
    assert len(runner(["paris", "the river"], max_new_tokens=3)) == 2
