"""transformers pipelines on tiny random selfattn models with a WordPiece (BERT) tokenizer, loaded from saved
folders by name like any Hub model. transformers 5 removed the question-answering pipeline, so the QA head is
checked by extracting a span by hand."""

import logging

import pytest
import torch
from transformers import AutoModelForQuestionAnswering, BertTokenizer, pipeline

from conftest import make_tiny_config
from modeling_selfattn import (
    SelfAttnForMaskedLM,
    SelfAttnForQuestionAnswering,
    SelfAttnForSequenceClassification,
    SelfAttnForTokenClassification,
    SelfAttnModel,
)

WORDS = (
    "the a cat dog sat on mat paris is in france where who lives capital of city river good bad movie was "
    "very great awful i liked it ."
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["##s", "##ed"]


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizer(vocab={token: index for index, token in enumerate(VOCAB)})


@pytest.fixture
def saved(tokenizer, tmp_path):
    """Saves a tiny model of `model_class` with the tokenizer; returns (folder, model)."""

    def save(model_class, labels=None, **config_overrides):
        if labels is not None:
            # transformers 5 does not derive label2id from id2label; pipelines need both.
            config_overrides.update(
                id2label=dict(enumerate(labels)), label2id={label: index for index, label in enumerate(labels)}
            )
        torch.manual_seed(0)
        model = model_class(make_tiny_config("encoder", vocab_size=len(tokenizer), **config_overrides)).eval()
        folder = tmp_path / model_class.__name__
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return str(folder), model

    return save


@pytest.fixture(autouse=True)
def no_unsupported_model_errors():
    """Pipelines log (rather than raise) an error for a model class missing from their task's tables."""
    records = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)
    messages = [record.getMessage() for record in records]
    assert not any("not supported" in message for message in messages), messages


def test_fill_mask(saved, tokenizer):
    folder, model = saved(SelfAttnForMaskedLM)
    fill_mask = pipeline("fill-mask", model=folder)
    assert type(fill_mask.model) is SelfAttnForMaskedLM
    text = "the cat sat on the [MASK] ."
    predictions = fill_mask(text, top_k=3)
    assert len(predictions) == 3
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits[0, encoded.input_ids[0].tolist().index(tokenizer.mask_token_id)]
    probabilities = logits.softmax(-1)
    # Each prediction is the token holding its rank's probability: tokens within the tolerance of each other
    # may swap ranks between the pipeline's copy of the weights and this model.
    for prediction, score in zip(predictions, probabilities.topk(3).values):
        assert set(prediction) == {"score", "token", "token_str", "sequence"}
        assert prediction["score"] == pytest.approx(probabilities[prediction["token"]].item(), abs=1e-5)
        assert prediction["score"] == pytest.approx(score.item(), abs=1e-5)
        assert prediction["token_str"] == tokenizer.decode([prediction["token"]])
        assert prediction["token_str"] in prediction["sequence"]


def test_text_classification(saved, tokenizer):
    folder, model = saved(SelfAttnForSequenceClassification, labels=["negative", "positive"])
    classify = pipeline("text-classification", model=folder)
    texts = ["i liked the movie .", "it was very awful"]
    results = classify(texts, top_k=None)
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**encoded).logits.softmax(-1)
    for result, expected in zip(results, probabilities):
        assert {entry["label"] for entry in result} == {"negative", "positive"}
        for entry in result:
            index = model.config.label2id[entry["label"]]
            assert entry["score"] == pytest.approx(expected[index].item(), abs=1e-5)


def test_token_classification(saved):
    folder, _ = saved(SelfAttnForTokenClassification, labels=["O", "B-LOC", "I-LOC"])
    tag = pipeline("token-classification", model=folder, ignore_labels=[])
    text = "the cats sat in paris"
    entities = tag(text)
    # one entry per word piece: the, cat, ##s, sat, in, paris
    assert [entity["word"] for entity in entities] == ["the", "cat", "##s", "sat", "in", "paris"]
    for entity in entities:
        assert entity["entity"] in {"O", "B-LOC", "I-LOC"} and 0 < entity["score"] <= 1
        assert text[entity["start"] : entity["end"]] == entity["word"].removeprefix("##")

    grouped = pipeline("token-classification", model=folder, ignore_labels=[], aggregation_strategy="first")(text)
    assert grouped and not any(group["word"].startswith("##") for group in grouped), grouped
    assert all(text[group["start"] : group["end"]] == group["word"] for group in grouped), grouped


def test_feature_extraction(saved, tokenizer):
    folder, model = saved(SelfAttnModel)
    features = pipeline("feature-extraction", model=folder, return_tensors=True)("where is the river")
    encoded = tokenizer("where is the river", return_tensors="pt")
    with torch.no_grad():
        expected = model(**encoded).last_hidden_state
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)


def test_zero_shot_classification(saved):
    folder, _ = saved(SelfAttnForSequenceClassification, labels=["entailment", "neutral", "contradiction"])
    result = pipeline("zero-shot-classification", model=folder)("the movie was great", ["good", "bad"])
    assert sorted(result["labels"]) == ["bad", "good"]
    assert sum(result["scores"]) == pytest.approx(1.0, abs=1e-5)


def test_question_answering_span(saved, tokenizer):
    folder, _ = saved(SelfAttnForQuestionAnswering)
    model = AutoModelForQuestionAnswering.from_pretrained(folder)
    question, context = "where is paris ?", "paris is the capital of france"
    encoded = tokenizer(question, context, return_offsets_mapping=True, return_tensors="pt")
    offsets = encoded.pop("offset_mapping")[0]
    with torch.no_grad():
        output = model(**encoded)
    in_context = torch.tensor([sequence == 1 for sequence in encoded.sequence_ids(0)])
    start_logits = output.start_logits[0].masked_fill(~in_context, float("-inf"))
    end_logits = output.end_logits[0].masked_fill(~in_context, float("-inf"))
    # best span with start <= end
    scores = start_logits[:, None] + end_logits[None, :]
    scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).tril(-1), float("-inf"))
    start, end = divmod(scores.argmax().item(), scores.shape[1])
    answer = context[offsets[start][0] : offsets[end][1]]
    assert answer and answer in context and start <= end
