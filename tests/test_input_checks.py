"""What the model classes do with the arguments they are given: every keyword is honoured or refused, bad inputs
get an error that names the argument, the problem and the fix, and the output does not depend on the internal path
(unpadded, padded, recorded outputs, torch.compile, torch.export).

Tolerances: outputs computed on two different paths are compared within 1e-5 (fp32; the paths sum in other orders).
"""

import json
import logging
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_MAX_POSITIONS, make_tiny_config
from modeling_selfattn import (
    SelfAttnConfig,
    SelfAttnForCausalLM,
    SelfAttnForConditionalGeneration,
    SelfAttnForMaskedLM,
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
    with pytest.raises(ValueError, match="Both `past_key_values` and `cache`"):
        model(**step, past_key_values=prefix, cache=prefix)


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
        ids, labels=torch.tensor([0, 1]), num_items_in_batch=torch.tensor(2), output_attentions=True,
        output_hidden_states=True, return_dict=True,
    )
    assert output.loss is not None and len(output.attentions) == 2 and len(output.hidden_states) == 3


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
