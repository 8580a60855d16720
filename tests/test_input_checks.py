"""What the model classes do with the arguments they are given: every keyword is honoured or refused, bad inputs
get an error that names the argument, the problem and the fix, and the output does not depend on the internal path
(unpadded, padded, recorded outputs, torch.compile, torch.export).

Tolerances: outputs computed on two different paths are compared within 1e-5 (fp32; the paths sum in other orders).
"""

import json
import logging
import re
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from conftest import TINY_MAX_POSITIONS, make_tiny_config
from modeling_selfattn import (
    SelfAttnConfig,
    SelfAttnForCausalLM,
    SelfAttnForConditionalGeneration,
    SelfAttnForMaskedLM,
    SelfAttnForMultipleChoice,
    SelfAttnForPreTraining,
    SelfAttnForQuestionAnswering,
    SelfAttnForReplacedTokenDetection,
    SelfAttnForSequenceClassification,
    SelfAttnModel,
)
from modeling_selfattn.packing import MIN_PADDING_SHARE_TO_UNPAD

ATOL = 1e-5


def random_ids(batch_size: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 99, (batch_size, length), generator=generator)


def tiny(model_class, shape: str, **overrides):
    torch.manual_seed(0)
    return model_class(make_tiny_config(shape, **overrides)).eval()


# ---------------------------------------------------------------------------------------------------------------
# The cache under its old name


@pytest.mark.parametrize("shape", ["decoder", "encoder_decoder"])
def test_past_key_values_is_the_cache_under_its_old_name(shape):
    model = tiny(SelfAttnForCausalLM if shape == "decoder" else SelfAttnForConditionalGeneration, shape)
    ids = random_ids(2, 6)
    if shape == "decoder":
        full = model(ids).logits[:, -1]
        prefix = model(ids[:, :5], use_cache=True).cache
        step = dict(input_ids=ids[:, 5:])
    else:
        source = random_ids(2, 7, seed=1)
        full = model(source, decoder_input_ids=ids).logits[:, -1]
        prefix = model(source, decoder_input_ids=ids[:, :5], use_cache=True).cache
        step = dict(input_ids=source, decoder_input_ids=ids[:, 5:])
    with pytest.warns(FutureWarning, match="past_key_values"):
        logits = model(**step, past_key_values=prefix).logits[:, -1]
    torch.testing.assert_close(logits, full, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="got both cache and past_key_values .*PEFT.s prefix tuning"):
        model(**step, past_key_values=prefix, cache=prefix)


def test_cache_and_past_key_values_one_of_them_none_passes_on_the_other():
    """Both keys, one None: transformers' rename kept `cache` and dropped past_key_values (cache=None with
    past_key_values=prefix silently decoded without the prefix), with a warning that printed the whole cache."""
    import warnings

    model = tiny(SelfAttnForCausalLM, "decoder")
    ids = random_ids(2, 6)
    full = model(ids).logits[:, -1]

    def prefix():
        return model(ids[:, :5], use_cache=True).cache

    with pytest.warns(FutureWarning) as caught:
        logits = model(ids[:, 5:], past_key_values=prefix(), cache=None).logits[:, -1]
    torch.testing.assert_close(logits, full, rtol=0, atol=ATOL)
    assert all("Both" not in str(warning.message) and "Cache" not in str(warning.message) for warning in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits = model(ids[:, 5:], past_key_values=None, cache=prefix()).logits[:, -1]
    torch.testing.assert_close(logits, full, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# Unknown keywords


@pytest.mark.parametrize(
    "model_class, shape, keyword",
    [
        (SelfAttnModel, "encoder", "atention_mask"),
        (SelfAttnForSequenceClassification, "encoder", "label"),
        (SelfAttnForMaskedLM, "encoder", "decoder_input_ids"),
        (SelfAttnForCausalLM, "decoder", "encoder_hidden_states"),
        (SelfAttnForCausalLM, "decoder", "decoder_input_ids"),
        (SelfAttnForCausalLM, "decoder", "encoder_attention_mask"),
        (SelfAttnForConditionalGeneration, "encoder_decoder", "decoder_atention_mask"),
    ],
)
def test_unknown_keyword_is_refused_by_name(model_class, shape, keyword):
    model = tiny(model_class, shape)
    ids = random_ids(2, 5)
    inputs = {"decoder_input_ids": ids} if shape == "encoder_decoder" else {}
    with pytest.raises(TypeError, match=rf"{model_class.__name__}\.forward\(\) got unexpected keyword.*'{keyword}'"):
        model(ids, **inputs, **{keyword: torch.ones_like(ids)})


def test_keywords_transformers_passes_on_are_accepted():
    torch.manual_seed(0)
    config = make_tiny_config("encoder")
    model = SelfAttnForSequenceClassification._from_config(config, attn_implementation="eager").eval()
    ids = random_ids(2, 5)
    output = model(
        ids, labels=torch.tensor([0, 1]), output_attentions=True, output_hidden_states=True, return_dict=True
    )
    assert output.loss is not None and len(output.attentions) == 2 and len(output.hidden_states) == 3


# The heads whose loss is a mean over their batch (accepts_loss_kwargs=False), with labels.
LOSS_IS_A_BATCH_MEAN = {
    SelfAttnForSequenceClassification: lambda ids: dict(input_ids=ids, labels=torch.tensor([0, 1])),
    SelfAttnForMultipleChoice: lambda ids: dict(input_ids=ids.unsqueeze(0), labels=torch.tensor([1])),
    SelfAttnForPreTraining: lambda ids: dict(input_ids=ids, labels=ids, next_sentence_label=torch.tensor([0, 1])),
    SelfAttnForReplacedTokenDetection: lambda ids: dict(input_ids=ids, labels=torch.zeros_like(ids)),
    # Its loss had divided by a count passed by hand, though Trainer passes it none.
    SelfAttnForQuestionAnswering: lambda ids: dict(
        input_ids=ids, start_positions=torch.tensor([0, 1]), end_positions=torch.tensor([2, 3])
    ),
}


@pytest.mark.parametrize("model_class", LOSS_IS_A_BATCH_MEAN, ids=lambda model_class: model_class.__name__)
def test_num_items_in_batch_is_refused_where_the_loss_is_a_batch_mean(model_class):
    # Trainer passes the count only where accepts_loss_kwargs is True; given by hand, it changed nothing.
    assert model_class.accepts_loss_kwargs is False
    model = tiny(model_class, "encoder")
    inputs = LOSS_IS_A_BATCH_MEAN[model_class](random_ids(2, 4))
    assert model(**inputs).loss is not None
    with pytest.raises(
        ValueError, match=rf"^num_items_in_batch has no effect on {model_class.__name__}, whose loss is a mean over"
    ):
        model(**inputs, num_items_in_batch=torch.tensor(100))


# The heads whose output is read from the first position, with how to call them on (batch, length) ids and mask, and
# the output named in the refusal.
FIRST_TOKEN_OUTPUTS = {
    SelfAttnForSequenceClassification: (lambda ids, mask: dict(input_ids=ids, attention_mask=mask), "logits"),
    SelfAttnForMultipleChoice: (
        lambda ids, mask: dict(input_ids=ids.unsqueeze(0), attention_mask=mask.unsqueeze(0)),
        "logits",
    ),
    SelfAttnForPreTraining: (
        lambda ids, mask: dict(input_ids=ids, attention_mask=mask),
        "next-sentence logits (seq_relationship_logits)",
    ),
}


@pytest.mark.parametrize("model_class", FIRST_TOKEN_OUTPUTS, ids=lambda model_class: model_class.__name__)
def test_left_padding_is_refused_where_the_output_is_the_first_token(model_class):
    """Under left padding the first position is padding, which holds the pad token's embedding (the padding rule):
    every left-padded row got the same logits whatever its text (1.43 off BertForSequenceClassification's on the same
    weights). Right padding and rows of padding alone pass; a row that starts with padding and has tokens further on
    is refused, named."""
    model = tiny(model_class, "encoder")
    call, output = FIRST_TOKEN_OUTPUTS[model_class]
    ids = random_ids(3, 6)
    right = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert model(**call(ids, right))[0] is not None
    left = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    rows = "(example, choice) pairs [(0, 1), (0, 2)]" if model_class is SelfAttnForMultipleChoice else "rows [1, 2]"
    message = (
        rf"^attention_mask: {re.escape(rows)} are padded on the left .*{model_class.__name__} reads its "
        rf"{re.escape(output)} from the first position.*Pad on the right: "
        r'tokenizer\.padding_side = "right"'
    )
    with pytest.raises(ValueError, match=message):
        model(**call(ids, left))


def test_left_padding_stays_allowed_in_the_bare_model():
    """The bare model takes left padding (its last_hidden_state at real tokens is what a decoder or a mean pooling
    reads); its pooler_output of a left-padded row reads the padding position, the same for every such row whatever
    its text, as README's "Padding positions" says."""
    model = tiny(SelfAttnModel, "encoder", add_pooling_layer=True)
    ids = random_ids(3, 6)
    left = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    ids = ids.masked_fill(left == 0, model.config.pad_token_id)
    output = model(ids, attention_mask=left)
    torch.testing.assert_close(output.pooler_output[1], output.pooler_output[2], rtol=0, atol=ATOL)


def test_text_classification_pipeline_pads_on_the_right(tmp_path):
    """The text-classification pipeline pads a batch with its tokenizer's padding side, the right for BERT-style
    tokenizers: batched, it gives each text's own scores, as one at a time."""
    from transformers import BertTokenizer, pipeline

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] the movie was very good bad i liked it".split()
    tokenizer = BertTokenizer(vocab={word: index for index, word in enumerate(words)})
    assert tokenizer.padding_side == "right"
    model = tiny(SelfAttnForSequenceClassification, "encoder", vocab_size=len(words))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    classify = pipeline("text-classification", model=str(tmp_path), top_k=None)
    texts = ["the movie was very good", "bad", "i liked it"]
    batched, alone = classify(texts, batch_size=3), [classify(text)[0] for text in texts]
    for batched_scores, alone_scores in zip(batched, alone):
        assert [entry["label"] for entry in batched_scores] == [entry["label"] for entry in alone_scores]
        for batched_entry, alone_entry in zip(batched_scores, alone_scores):
            assert batched_entry["score"] == pytest.approx(alone_entry["score"], abs=ATOL)
    tokenizer.padding_side = "left"
    left_classify = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)
    with pytest.raises(ValueError, match="padded on the left"):
        left_classify(texts, batch_size=3)


def test_causal_lm_reads_shift_labels_over_labels_and_refuses_a_malformed_logits_to_keep():
    # Trainer's context-parallel path passes both, the targets aligned before the sequence was split as
    # shift_labels; transformers' common test test_causal_lm_loss_honors_shift_labels asks that those win.
    model = tiny(SelfAttnForCausalLM, "decoder")
    ids = random_ids(1, 4)
    shifted = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    alone = model(ids, shift_labels=shifted).loss
    torch.testing.assert_close(model(ids, labels=ids, shift_labels=shifted).loss, alone, rtol=0, atol=0)
    torch.testing.assert_close(model(ids, labels=ids).loss, alone, rtol=0, atol=ATOL)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=rf"^logits_to_keep must be an int >= 0 .* got {bad!r}"):
            model(ids, logits_to_keep=bad)
    for good, kept in ((0, 4), (1, 1), (torch.tensor([0, 2]), 2)):
        assert model(ids, logits_to_keep=good).logits.shape[1] == kept


def test_trainer_evaluates_a_causal_lm_with_labels_alone(tmp_path):
    # Trainer counts every forward() parameter named like a label among its label_names, and scores an evaluation
    # batch only when it holds them all: shift_labels is taken as a keyword, outside the signature, as in
    # transformers' causal LMs (as a parameter it left evaluate() without eval_loss and compute_metrics uncalled).
    from transformers import Trainer, TrainingArguments

    model = tiny(SelfAttnForCausalLM, "decoder")
    data = [{"input_ids": ids, "labels": ids} for ids in random_ids(8, 6).tolist()]
    counted = []
    args = TrainingArguments(tmp_path, report_to=[], use_cpu=True, per_device_eval_batch_size=4)
    def compute_metrics(predictions):
        counted.append(1)
        return {"n": len(predictions.label_ids)}

    trainer = Trainer(model=model, args=args, eval_dataset=data, compute_metrics=compute_metrics)
    assert trainer.label_names == ["labels"]
    metrics = trainer.evaluate()
    assert metrics["eval_n"] == 8 and counted
    with torch.no_grad():
        batch = torch.tensor([row["input_ids"] for row in data])
        expected = torch.stack([model(batch[i : i + 4], labels=batch[i : i + 4]).loss for i in (0, 4)]).mean()
    assert metrics["eval_loss"] == pytest.approx(expected.item(), abs=1e-5)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['shift_label'\].*'shift_labels'"):
        model(batch, shift_label=batch)


def test_causal_lm_honours_token_type_ids():
    model = tiny(SelfAttnForCausalLM, "decoder")
    ids = random_ids(1, 5)
    token_types = torch.tensor([[0, 0, 1, 1, 1]])
    assert not torch.allclose(model(ids).logits, model(ids, token_type_ids=token_types).logits)


# ---------------------------------------------------------------------------------------------------------------
# Labels


@pytest.mark.parametrize(
    "model_class, given, missing",
    [
        (SelfAttnForQuestionAnswering, "start_positions", "end_positions"),
        (SelfAttnForQuestionAnswering, "end_positions", "start_positions"),
        (SelfAttnForPreTraining, "labels", "next_sentence_label"),
        (SelfAttnForPreTraining, "next_sentence_label", "labels"),
    ],
)
def test_a_loss_of_two_labels_refuses_one_alone(model_class, given, missing):
    model = tiny(model_class, "encoder")
    ids = random_ids(2, 5)
    labels = {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([2, 3]), "labels": ids,
              "next_sentence_label": torch.tensor([0, 1])}  # fmt: skip
    with pytest.raises(ValueError, match=rf"^{given} was given without {missing}: the loss needs both\. Pass {missing}"):
        model(ids, **{given: labels[given]})
    assert model(ids, **{given: labels[given], missing: labels[missing]}).loss is not None


MODEL_LOGGER = "modeling_selfattn.model"


def test_labels_turn_the_cache_off_with_a_warning_where_use_cache_asks_for_it(caplog):
    model = tiny(SelfAttnForConditionalGeneration, "encoder_decoder")
    source, target = random_ids(2, 7), random_ids(2, 5, seed=1)
    with caplog.at_level(logging.WARNING, logger=MODEL_LOGGER):
        assert model(source, labels=target, use_cache=True).cache is None
        warned = [record.getMessage() for record in caplog.records if record.name == MODEL_LOGGER]
        assert warned == [
            "The `use_cache` argument is changed to `False` since `labels` is provided. Leave use_cache unset when "
            "passing labels."
        ]
        caplog.clear()
        model(source, labels=target)
        model(source, labels=target, use_cache=False)
        assert not caplog.records


# ---------------------------------------------------------------------------------------------------------------
# One value at padding positions on every path


def heavily_padded_batch(length: int = 12):
    """A batch whose padding share is above the unpadding threshold, and the same sequences under light padding."""
    ids = random_ids(3, length)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    assert 1 - mask.float().mean() >= MIN_PADDING_SHARE_TO_UNPAD
    return ids, mask


def encoder_model():
    return tiny(SelfAttnModel, "encoder", add_pooling_layer=False)


def test_padding_positions_hold_the_embedding_output():
    model = encoder_model()
    ids, mask = heavily_padded_batch()
    output = model(ids, attention_mask=mask).last_hidden_state
    embeddings = model.encoder.embeddings(ids)
    padding = mask == 0
    torch.testing.assert_close(output[padding], embeddings[padding], rtol=0, atol=0)


def test_padding_positions_agree_across_eager_paths():
    model = encoder_model()
    ids, mask = heavily_padded_batch()
    unpadded = model(ids, attention_mask=mask).last_hidden_state
    recorded = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(recorded.last_hidden_state, unpadded, rtol=0, atol=ATOL)
    # Light padding takes the padded path: the first sequence alone, padded by one position.
    light_ids, light_mask = ids[:1, :6].clone(), torch.ones(1, 6, dtype=torch.long)
    light_mask[0, 5] = 0
    light = model(light_ids, attention_mask=light_mask).last_hidden_state
    alone = model(ids[:1, :5]).last_hidden_state
    torch.testing.assert_close(light[:, :5], alone, rtol=0, atol=ATOL)
    torch.testing.assert_close(light[0, 5], model.encoder.embeddings(light_ids)[0, 5], rtol=0, atol=0)


def test_padding_positions_agree_under_torch_compile():
    model = encoder_model()
    ids, mask = heavily_padded_batch()
    eager = model(ids, attention_mask=mask).last_hidden_state
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids, attention_mask=mask).last_hidden_state, eager, rtol=0, atol=ATOL)


def test_exported_model_agrees_with_eager_on_every_element():
    model = encoder_model()
    ids, mask = heavily_padded_batch()
    exported = torch.export.export(model, args=(ids,), kwargs={"attention_mask": mask})
    eager = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(
        exported.module()(ids, attention_mask=mask).last_hidden_state, eager, rtol=0, atol=ATOL
    )


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_checkpoint_without_the_shared_token_table_reports_it_missing(tmp_path):
    model = tiny(SelfAttnForConditionalGeneration, "encoder_decoder")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = {name: tensor for name, tensor in load_file(weights).items() if "word_embeddings" not in name}
    save_file(tensors, weights, metadata={"format": "pt"})

    reloaded, info = SelfAttnForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert "model.encoder.embeddings.word_embeddings.weight" in info["missing_keys"]
    table = reloaded.model.encoder.embeddings.word_embeddings.weight
    assert table.device.type == "cpu"
    assert 0.5 * model.config.initializer_range < table.std().item() < 2 * model.config.initializer_range
    assert reloaded.lm_head.weight is table and reloaded.model.decoder.embeddings.word_embeddings.weight is table
    reloaded(random_ids(1, 4), decoder_input_ids=random_ids(1, 3))  # runs: nothing left on the meta device


def test_corrupt_config_json_is_named(tmp_path):
    tiny(SelfAttnModel, "encoder").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "selfattn",')
    with pytest.raises((OSError, ValueError), match="config.json"):
        SelfAttnModel.from_pretrained(tmp_path)


def test_missing_local_folder_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for missing in (tmp_path / "nothing-here", "./nothing-here", "outputs/nothing-here", "a/b/c"):
        started = time.monotonic()
        with pytest.raises(OSError, match="names no existing folder"):
            SelfAttnModel.from_pretrained(missing)
        assert time.monotonic() - started < 5, "fails before any attempt to reach the Hub"


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_foreign_config_json_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "vocab_size": 100}))
    with pytest.raises(ValueError, match="model_type='gpt2'.*selfattn configs only"):
        SelfAttnConfig.from_json_file(path)


@pytest.mark.parametrize("pad_token_id", [-1, 99])
def test_pad_token_id_outside_the_vocabulary_is_refused(pad_token_id):
    with pytest.raises(ValueError, match="pad_token_id must be a token id in \\[0, 98\\]"):
        make_tiny_config("encoder", pad_token_id=pad_token_id)


@pytest.mark.parametrize("position_embedding_type", ["learned", "sinusoidal"])
def test_negative_position_ids_are_refused(position_embedding_type):
    model = tiny(SelfAttnModel, "encoder", position_embedding_type=position_embedding_type)
    with pytest.raises(ValueError, match="position_ids contains ids outside the position table"):
        model(random_ids(1, 3), position_ids=torch.tensor([[-1, 0, 1]]))


def test_replaced_token_labels_must_be_zero_or_one():
    model = tiny(SelfAttnForReplacedTokenDetection, "encoder")
    with pytest.raises(ValueError, match="may hold only 0 .* and 1"):
        model(random_ids(1, 3), labels=torch.tensor([[0, 1, 2]]))


def test_attention_mask_values_must_be_zero_or_one():
    model = tiny(SelfAttnForReplacedTokenDetection, "encoder")
    with pytest.raises(ValueError, match="attention_mask may hold only 1 .* and 0"):
        model(random_ids(1, 3), attention_mask=torch.tensor([[1, 1, 2]]), labels=torch.tensor([[0, 1, 0]]))


def test_causal_lm_generating_past_the_position_table_says_so():
    model = tiny(SelfAttnForCausalLM, "decoder")
    with pytest.raises(ValueError, match="position_ids contains ids outside the position table.*max_new_tokens"):
        model.generate(random_ids(1, TINY_MAX_POSITIONS - 2), max_new_tokens=5, do_sample=False)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch_or_sequence_is_refused(shape):
    model = tiny(SelfAttnModel, "encoder")
    with pytest.raises(ValueError, match="at least one sequence of at least one token"):
        model(torch.zeros(shape, dtype=torch.long))


def test_wrong_width_inputs_embeds_are_refused():
    with pytest.raises(ValueError, match=r"inputs_embeds has shape \(2, 5, 31\).*\(batch_size, sequence_length, 32\)"):
        tiny(SelfAttnModel, "encoder")(inputs_embeds=torch.randn(2, 5, 31))


def test_wrong_shape_token_type_ids_are_refused():
    with pytest.raises(ValueError, match=r"token_type_ids has shape \(2, 4\)"):
        tiny(SelfAttnModel, "encoder")(random_ids(2, 5), token_type_ids=torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("padded", [False, True], ids=["full", "unpadded"])
def test_token_type_ids_of_a_model_without_a_token_type_table_are_checked(padded):
    # type_vocab_size=0 (DistilBERT conversions, the paper presets): every token is segment 0. Zeros are that one
    # segment; other ids or another shape are refused, as a model with a table refuses them, not dropped.
    model = tiny(SelfAttnModel, "encoder", type_vocab_size=0)
    ids = random_ids(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    if padded:
        mask[1, 2:] = 0
    expected = model(ids, attention_mask=mask).last_hidden_state
    zeros = model(ids, attention_mask=mask, token_type_ids=torch.zeros(2, 8, dtype=torch.long)).last_hidden_state
    torch.testing.assert_close(zeros, expected, rtol=0, atol=0)
    second_segment = torch.zeros(2, 8, dtype=torch.long)
    second_segment[:, 4:] = 1
    with pytest.raises(ValueError, match=r"token_type_ids contains ids outside the single segment \[0, 0\] \(min 0, "
                                         r"max 1\)\. This model has no token-type embeddings \(config\.type_vocab_size=0\)"):
        model(ids, attention_mask=mask, token_type_ids=second_segment)
    with pytest.raises(ValueError, match=r"token_type_ids has shape \(7, 3\)"):
        model(ids, attention_mask=mask, token_type_ids=torch.zeros(7, 3, dtype=torch.long))


@pytest.mark.parametrize("mask_shape", [(5,), (2, 5, 5)])
def test_attention_mask_of_the_wrong_rank_is_refused(mask_shape):
    with pytest.raises(ValueError, match=r"attention_mask has shape .* \(batch_size, key_length\)"):
        tiny(SelfAttnModel, "encoder")(random_ids(2, 5), attention_mask=torch.ones(mask_shape, dtype=torch.long))


def test_integer_inputs_embeds_are_promoted_as_bert_promotes_them():
    """BertEmbeddings adds its float position and token-type embeddings to inputs_embeds, so integer vectors count as
    the same vectors in float (torch's type promotion): a meaningful result, which selfattn now gives too. It cast
    the positions to the inputs' integer dtype instead, truncating them to 0: every position looked alike."""
    vectors = torch.randint(-2, 3, (2, 4, 32), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(vocab_size=99, hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=37)
    ).eval()
    for model in (tiny(SelfAttnModel, "encoder"), bert):
        from_floats = model(inputs_embeds=vectors.float()).last_hidden_state
        torch.testing.assert_close(model(inputs_embeds=vectors).last_hidden_state, from_floats, rtol=0, atol=0)


MASK_4D_MESSAGE = (
    r"attention_mask is 4-D with shape \(2, 1, 3, 3\), which does not fit the attention scores' \(batch_size, heads, "
    r"query_length, key_length\) = \(2, heads, 4, 4\)"
)
# shape, inputs replacing the good ones, error, message
PER_TOKEN_INPUTS = {
    "position_ids_longer": (
        "encoder",
        dict(position_ids=torch.arange(5).expand(2, 5)),
        ValueError,
        r"position_ids has shape \(2, 5\) but the inputs have \(batch_size, sequence_length\) = \(2, 4\), or "
        r"\(1, 4\) or \(4,\) shared by the batch",
    ),
    "position_ids_shorter_causal_lm": (
        "decoder", dict(position_ids=torch.arange(3).expand(2, 3)), ValueError, r"position_ids has shape \(2, 3\)"
    ),
    "position_ids_float": (
        "encoder",
        dict(position_ids=torch.arange(4.0).expand(2, 4)),
        ValueError,
        r"position_ids must hold integer ids \(torch.long or torch.int\), got a torch.float32 tensor",
    ),
    "input_ids_float": ("encoder", dict(input_ids=random_ids(2, 4).float()), ValueError, "input_ids must hold integer"),
    "token_type_ids_float": ("encoder", dict(token_type_ids=torch.zeros(2, 4)), ValueError, "token_type_ids must hold"),
    "attention_mask_4d_too_short": (
        "encoder", dict(attention_mask=torch.ones(2, 1, 3, 3, dtype=torch.bool)), ValueError, MASK_4D_MESSAGE
    ),
    "decoder_attention_mask_4d_other_batch": (
        "decoder",
        dict(attention_mask=torch.ones(3, 1, 4, 4, dtype=torch.bool)),
        ValueError,
        r"decoder attention_mask is 4-D with shape \(3, 1, 4, 4\)",
    ),
    "attention_mask_list": (
        "encoder",
        dict(attention_mask=[[1, 1, 1, 1], [1, 1, 1, 0]]),
        TypeError,
        "attention_mask must be a torch.Tensor, got list; tokenize with return_tensors='pt'",
    ),
}


@pytest.mark.parametrize("case", list(PER_TOKEN_INPUTS))
def test_per_token_inputs_and_masks_of_a_wrong_shape_or_type_are_named(case):
    # They failed deep in torch, naming no argument, where token_type_ids of the wrong shape got a clear error.
    shape, inputs, error, message = PER_TOKEN_INPUTS[case]
    model = tiny(SelfAttnModel, shape)
    with pytest.raises(error, match=f"^{message}"):
        model(**{"input_ids": random_ids(2, 4), **inputs})


def test_position_ids_shared_by_the_batch_and_broadcasting_4d_masks_are_accepted():
    model = tiny(SelfAttnModel, "encoder")
    ids = random_ids(2, 4)
    expected = model(ids).last_hidden_state
    for position_ids in (torch.arange(4), torch.arange(4).unsqueeze(0), torch.arange(4).expand(2, 4)):
        torch.testing.assert_close(model(ids, position_ids=position_ids).last_hidden_state, expected, rtol=0, atol=0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    expected = model(ids, attention_mask=mask).last_hidden_state
    for four_d in (mask.bool()[:, None, None, :], mask.bool()[:, None, None, :].expand(2, 1, 4, 4)):
        real = mask.bool()  # padding positions hold the embedding output with a 2-D mask alone
        got = model(ids, attention_mask=four_d).last_hidden_state
        torch.testing.assert_close(got[real], expected[real], rtol=0, atol=ATOL)


def test_encoder_only_model_takes_use_cache_as_bert_does():
    # BertModel takes use_cache on its encoder-only shape and returns no cache; transformers' common tests pass
    # use_cache=True to every class whose forward names it. A cache given to the encoder-only shape is refused.
    model = tiny(SelfAttnModel, "encoder")
    ids = random_ids(1, 4)
    output = model(ids, use_cache=True)
    assert "cache" not in output and "past_key_values" not in output
    torch.testing.assert_close(output.last_hidden_state, model(ids).last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("given", ["input_ids", "inputs_embeds"])
def test_encoder_outputs_with_encoder_inputs_are_refused_naming_both(given):
    # The encoder outputs replace the encoder's run: the inputs went unread (as in BART), without a word.
    model = tiny(SelfAttnForConditionalGeneration, "encoder_decoder")
    source, target = random_ids(1, 4), random_ids(1, 3, seed=1)
    encoder_outputs = model.get_encoder()(source)
    inputs = {"input_ids": source, "inputs_embeds": model.get_input_embeddings()(source)}
    with pytest.raises(ValueError, match=rf"^encoder_outputs and {given} were both given"):
        model(**{given: inputs[given]}, encoder_outputs=encoder_outputs, decoder_input_ids=target)
    reused = model(encoder_outputs=encoder_outputs, decoder_input_ids=target).logits
    torch.testing.assert_close(reused, model(source, decoder_input_ids=target).logits, rtol=0, atol=ATOL)


def test_wrong_width_encoder_outputs_are_refused():
    model = tiny(SelfAttnForConditionalGeneration, "encoder_decoder")
    with pytest.raises(ValueError, match="encoder_outputs hold states 16 wide but this model is 32 wide"):
        model(decoder_input_ids=random_ids(2, 3), encoder_outputs=(torch.randn(2, 5, 16),))


def test_legacy_tuple_cache_is_refused():
    model = tiny(SelfAttnForCausalLM, "decoder")
    ids = random_ids(1, 6)
    cache = model(ids[:, :5], use_cache=True).cache
    legacy = tuple((layer.keys, layer.values) for layer in cache.layers)
    with pytest.raises(TypeError, match="cache must be a transformers Cache, got tuple"):
        model(ids[:, 5:], cache=legacy)


def test_packed_sequence_offsets_need_flash_attention():
    # With SDPA or eager attention the offsets would be ignored and the packed sequences attend to each other.
    model = tiny(SelfAttnModel, "encoder")
    offsets = torch.tensor([0, 3, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="only flash attention keeps apart.*attn_implementation='sdpa'"):
        model(random_ids(1, 5), cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=3, max_length_k=3)
    with pytest.raises(ValueError, match="only flash attention keeps apart"):
        model(random_ids(1, 5), seq_idx=torch.tensor([[0, 0, 0, 1, 1]]))


def test_sequence_index_without_offsets_is_refused_under_flash_attention():
    model = tiny(SelfAttnModel, "encoder")
    model.config._attn_implementation = "flash_attention_2"  # the check runs before any kernel is looked up
    with pytest.raises(ValueError, match="seq_idx was given without cu_seq_lens_q"):
        model(random_ids(1, 5), seq_idx=torch.tensor([[0, 0, 0, 1, 1]]))


@pytest.mark.parametrize("shape, keyword", [("encoder", "decoder_input_ids"), ("decoder", "encoder_outputs")])
def test_bare_model_refuses_arguments_its_shape_does_not_use(shape, keyword):
    model = tiny(SelfAttnModel, shape)
    ids = random_ids(1, 4)
    value = (torch.randn(1, 4, 32),) if keyword == "encoder_outputs" else ids
    with pytest.raises(ValueError, match=rf"\['{keyword}'\] have no use in this {shape}-only SelfAttnModel"):
        model(ids, **{keyword: value})


# The inputs' own errors come before a mismatched mask's, whose message would otherwise blame the mask for them.
INPUTS_CHECKED_FIRST = {
    "two_dimensional_embeddings": (lambda model: dict(inputs_embeds=torch.randn(16, 32)), "inputs_embeds"),
    "ids_outside_the_vocabulary": (lambda model: dict(input_ids=torch.full((2, 16), 10**6)), "input_ids"),
    "empty_ids": (lambda model: dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), "input_ids"),
}


@pytest.mark.parametrize("case", list(INPUTS_CHECKED_FIRST))
def test_the_inputs_are_checked_before_a_mismatched_mask(case):
    model = encoder_model()
    make, argument = INPUTS_CHECKED_FIRST[case]
    with pytest.raises(ValueError, match=f"^{argument}"):
        model(**make(model), attention_mask=torch.ones(1, 16, dtype=torch.long))
