"""BERT-family checkpoints -> selfattn and back: for every family and head of the conversion tables, a randomly
initialised transformers model of a tiny config, saved, converted (or loaded on the fly) gives the source's
outputs within 1e-5 (fp32 max abs diff) on a padded batch, and exporting it back gives bit-identical tensors.
Bad input (unknown architecture, tensors that map nowhere or are missing, shape mismatches) fails with an
error that lists every problem."""

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from modeling_selfattn import (
    SelfAttnConfig,
    SelfAttnForMaskedLM,
    SelfAttnForMultipleChoice,
    SelfAttnForReplacedTokenDetection,
    SelfAttnForSequenceClassification,
    SelfAttnModel,
    checkpoints,
)
from modeling_selfattn.checkpoints import (
    ENCODER_FAMILIES,
    FAMILIES,
    ConversionError,
    compare_outputs,
    convert_checkpoint,
    export_checkpoint,
    load_checkpoint,
    target_class,
    warm_start_encoder_decoder,
)

TOLERANCE = 1e-5
VOCAB_SIZE = 99
MAX_POSITIONS = 24
BATCH_LENGTHS = (11, 6, 8)  # a padded batch: rows shorter than the longest end in padding

# Tiny config per family, in that family's own field names. Non-default activations check that they carry over
# (RoBERTa's and ELECTRA's MLM heads fix gelu, so they keep it).
TINY_CONFIGS = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, hidden_act="gelu_new"),
    "roberta": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    ),
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, activation="relu"),
    # embedding_size < hidden_size: the embeddings are projected up.
    "electra": dict(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
}
TINY_CONFIGS["xlm-roberta"] = TINY_CONFIGS["roberta"]

# The encoder families; Marian and BART (converted one way) are tested in test_seq2seq_parity.py.
CASES = [(model_type, suffix) for model_type, family in ENCODER_FAMILIES.items() for suffix in family.heads]


def case_id(case):
    model_type, suffix = case
    return FAMILIES[model_type].architecture(suffix)


def source_config(model_type: str, suffix: str = "Model", **overrides):
    # Three labels for classifiers; extractive QA always has two outputs (start, end).
    num_labels = 2 if suffix == "ForQuestionAnswering" else 3
    fields = dict(TINY_CONFIGS[model_type], vocab_size=VOCAB_SIZE, num_labels=num_labels, **overrides)
    positions = MAX_POSITIONS + (fields["pad_token_id"] + 1 if model_type.endswith("roberta") else 0)
    return transformers.AutoConfig.for_model(model_type, max_position_embeddings=positions, **fields)


def random_source_model(architecture: str, config, seed: int = 0):
    """A transformers model whose every parameter (LayerNorms and biases too) is random, in eval mode."""
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def padded_batch(config, multiple_choice: bool = False) -> dict:
    generator = torch.Generator().manual_seed(1)
    pad = config.pad_token_id
    input_ids = torch.randint(3, VOCAB_SIZE, (len(BATCH_LENGTHS), max(BATCH_LENGTHS)), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(BATCH_LENGTHS):
        attention_mask[row, :length] = 1
    inputs = {"input_ids": input_ids.masked_fill(attention_mask == 0, pad), "attention_mask": attention_mask}
    if getattr(config, "type_vocab_size", 0) > 1:
        inputs["token_type_ids"] = (torch.arange(input_ids.shape[1]) >= 4).long().expand_as(input_ids) * attention_mask
    if multiple_choice:  # 3 examples become 1 question with 3 choices
        inputs = {name: tensor.unsqueeze(0) for name, tensor in inputs.items()}
    return inputs


def max_diffs(source_model, model, architecture: str) -> dict[str, float]:
    inputs = padded_batch(source_model.config, multiple_choice=architecture.endswith("ForMultipleChoice"))
    with torch.no_grad():
        return compare_outputs(
            source_model(**inputs, output_hidden_states=True),
            model(**inputs, output_hidden_states=True),
            inputs["attention_mask"],
        )


@pytest.fixture(scope="module")
def saved_sources(tmp_path_factory):
    """architecture -> (source model, its saved folder), built once per module."""
    cache = {}

    def get(model_type: str, suffix: str):
        architecture = FAMILIES[model_type].architecture(suffix)
        if architecture not in cache:
            model = random_source_model(architecture, source_config(model_type, suffix))
            folder = tmp_path_factory.mktemp(architecture)
            model.save_pretrained(folder)
            cache[architecture] = (model, folder)
        return cache[architecture]

    return get


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_converted_model_matches_source(case, saved_sources):
    model_type, suffix = case
    family = FAMILIES[model_type]
    source_model, folder = saved_sources(model_type, suffix)
    model, report = convert_checkpoint(folder)
    assert type(model).__name__ == family.heads[suffix].target
    assert not report.problems() and report.mapped
    diffs = max_diffs(source_model, model, family.architecture(suffix))
    assert "last_hidden_state" in diffs and (suffix == "Model" or len(diffs) >= 2), diffs  # and the head's output
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_loads_without_conversion_step(case, saved_sources):
    model_type, suffix = case
    family = FAMILIES[model_type]
    source_model, folder = saved_sources(model_type, suffix)
    model_class = target_class(family.heads[suffix].target)
    model, loading_info = model_class.from_pretrained(folder, output_loading_info=True)
    assert not any(loading_info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading_info
    diffs = max_diffs(source_model, model.eval(), family.architecture(suffix))
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_round_trip_is_bit_exact(case, saved_sources, tmp_path):
    model_type, suffix = case
    source_model, folder = saved_sources(model_type, suffix)
    model, _ = convert_checkpoint(folder)
    model.save_pretrained(tmp_path)
    config, state_dict, report = export_checkpoint(tmp_path, model_type)
    assert not report.problems()
    original = load_checkpoint(folder)
    assert sorted(state_dict) == sorted(original)
    unequal = [name for name in original if not torch.equal(state_dict[name], original[name])]
    assert not unequal
    assert config.architectures == [FAMILIES[model_type].architecture(suffix)]
    original_config = source_model.config.to_dict()
    changed = {
        name: (value, original_config[name])
        for name, value in config.to_diff_dict().items()
        if name in original_config and name not in ("architectures", "transformers_version", "dtype")
        and value != original_config[name]
    }
    assert not changed


def test_head_missing_from_checkpoint_is_initialised_when_loading(saved_sources):
    """Fine-tuning from a pre-trained encoder: the classifier is new, the MLM head is reported unexpected."""
    source_model, folder = saved_sources("roberta", "ForMaskedLM")
    model, info = SelfAttnForSequenceClassification.from_pretrained(folder, num_labels=5, output_loading_info=True)
    assert model.config.num_labels == 5 and model.config.padding_aware_positions
    assert {"classifier.weight", "model.pooler.dense.weight"} <= set(info["missing_keys"])
    assert "lm_head.dense.weight" in info["unexpected_keys"]
    torch.testing.assert_close(  # a copied tensor: exact
        model.model.encoder.embeddings.word_embeddings.weight, source_model.roberta.embeddings.word_embeddings.weight,
        rtol=0, atol=0,
    )


def test_translated_config(saved_sources):
    _, folder = saved_sources("electra", "ForSequenceClassification")
    config = SelfAttnConfig.from_pretrained(folder)
    assert (config.embedding_size, config.hidden_size, config.pooler_activation) == (16, 32, "gelu")
    _, folder = saved_sources("roberta", "Model")
    config = SelfAttnConfig.from_pretrained(folder)
    assert (config.position_offset, config.max_position_embeddings, config.type_vocab_size) == (2, MAX_POSITIONS, 1)


def save_checkpoint(folder, config_dict: dict, state_dict: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_dict))
    save_file({name: tensor.contiguous() for name, tensor in state_dict.items()}, folder / "model.safetensors")


def bert_checkpoint(saved_sources, suffix="ForMaskedLM"):
    _, folder = saved_sources("bert", suffix)
    return json.loads((folder / "config.json").read_text()), load_file(folder / "model.safetensors")


# PreTrainedConfig fields that transformers' models and selfattn's read alike, at values other than the defaults.
GENERIC_FIELDS = {
    "chunk_size_feed_forward": 4,
    "return_dict": False,
    "output_attentions": True,
    "output_hidden_states": True,
}


def test_generic_config_fields_carry_over(saved_sources, tmp_path):
    """Converted, loaded without a conversion step and exported back; the converted model returns what the source
    model returns."""
    config_dict, state_dict = bert_checkpoint(saved_sources, "ForSequenceClassification")
    save_checkpoint(tmp_path / "bert", {**config_dict, **GENERIC_FIELDS}, state_dict)
    model, _ = convert_checkpoint(tmp_path / "bert")
    loaded = SelfAttnForSequenceClassification.from_pretrained(tmp_path / "bert")  # converted while loading
    for config in (model.config, loaded.config):
        assert {name: getattr(config, name) for name in GENERIC_FIELDS} == GENERIC_FIELDS
    # Eager attention, the one that returns attention weights: the conversion picks it too.
    source_model = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path / "bert", attn_implementation="eager"
    ).eval()
    inputs = {"input_ids": torch.tensor([[2, 5, 9, 3]])}  # 4 tokens: one chunk of 4
    with torch.no_grad():
        expected, actual = source_model(**inputs), model(**inputs)
    assert isinstance(actual, tuple) and len(actual) == len(expected) == 3  # logits, hidden states, attentions
    assert len(actual[2]) == len(expected[2]) == 2  # per layer
    model.save_pretrained(tmp_path / "selfattn")
    exported, _, _ = export_checkpoint(tmp_path / "selfattn")
    assert {name: getattr(exported, name) for name in GENERIC_FIELDS} == GENERIC_FIELDS


def test_generic_config_field_left_behind_is_kept_for_export(saved_sources, tmp_path, monkeypatch):
    """A field of every config that the tables would not carry over is kept for export where the source's value is
    not the default (which the exported config has anyway)."""
    config_dict, state_dict = bert_checkpoint(saved_sources)
    save_checkpoint(tmp_path, {**config_dict, "chunk_size_feed_forward": 4, "output_attentions": False}, state_dict)
    left_behind = ("chunk_size_feed_forward", "output_attentions")
    carried = tuple(name for name in checkpoints.SHARED_CONFIG_FIELDS if name not in left_behind)
    monkeypatch.setattr(checkpoints, "SHARED_CONFIG_FIELDS", carried)
    model, report = convert_checkpoint(tmp_path)
    assert model.config.source_config == {"chunk_size_feed_forward": 4}
    assert report.config_kept_for_export == ["chunk_size_feed_forward"] and not report.config_not_carried
    assert "config fields kept for export in source_config" in report.summary()


def test_tokenizer_class_is_carried_or_taken_from_the_model_type(saved_sources, tmp_path):
    """AutoTokenizer reads tokenizer_class from config.json where tokenizer_config.json names no class, and then
    goes by model_type, which the selfattn config no longer has: the conversion names the class that model_type
    implies."""
    config_dict, state_dict = bert_checkpoint(saved_sources, "Model")
    save_checkpoint(tmp_path / "named", {**config_dict, "tokenizer_class": "BertJapaneseTokenizer"}, state_dict)
    model, report = convert_checkpoint(tmp_path / "named")
    assert model.config.tokenizer_class == "BertJapaneseTokenizer" and not report.config_added
    assert SelfAttnModel.from_pretrained(tmp_path / "named").config.tokenizer_class == "BertJapaneseTokenizer"
    model.save_pretrained(tmp_path / "selfattn")
    assert export_checkpoint(tmp_path / "selfattn")[0].tokenizer_class == "BertJapaneseTokenizer"

    save_checkpoint(tmp_path / "unnamed", config_dict, state_dict)
    model, report = convert_checkpoint(tmp_path / "unnamed")
    assert model.config.tokenizer_class == "BertTokenizer"
    assert report.config_added == {"tokenizer_class": "BertTokenizer"} and "tokenizer_class" in report.summary()
    (tmp_path / "unnamed" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    model, report = convert_checkpoint(tmp_path / "unnamed")
    assert getattr(model.config, "tokenizer_class", None) is None and not report.config_added


def test_tokenizer_class_comes_from_the_family_table_whatever_is_installed(tmp_path, monkeypatch):
    """transformers maps marian to no tokenizer class without sentencepiece (not installed here), and any family to
    none without the package its tokenizer needs: the class a converted config.json names comes from the tables."""
    from transformers.models.auto import tokenization_auto

    monkeypatch.setattr(tokenization_auto, "TOKENIZER_MAPPING_NAMES", {})  # as if no tokenizer package were installed
    source = transformers.MarianConfig(
        vocab_size=VOCAB_SIZE, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=MAX_POSITIONS,
        pad_token_id=VOCAB_SIZE - 1, decoder_start_token_id=VOCAB_SIZE - 1, eos_token_id=0,
    )
    torch.manual_seed(0)
    transformers.MarianMTModel(source).save_pretrained(tmp_path / "marian")
    model, report = convert_checkpoint(tmp_path / "marian")
    assert model.config.tokenizer_class == "MarianTokenizer"
    assert report.config_added == {"tokenizer_class": "MarianTokenizer"}
    model.save_pretrained(tmp_path / "selfattn")
    assert json.loads((tmp_path / "selfattn" / "config.json").read_text())["tokenizer_class"] == "MarianTokenizer"


def test_family_tokenizer_classes_are_the_ones_autotokenizer_takes():
    """Each table's class is the one AutoTokenizer takes for the family's model_type, wherever transformers can say
    (where the packages a tokenizer needs are installed); MarianTokenizer is checked by name where it cannot."""
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    assert FAMILIES["marian"].tokenizer_class == "MarianTokenizer"
    for model_type, family in FAMILIES.items():
        assert hasattr(transformers, family.tokenizer_class), model_type
        if TOKENIZER_MAPPING_NAMES.get(model_type) is not None:
            assert family.tokenizer_class == TOKENIZER_MAPPING_NAMES[model_type], model_type


def test_fields_derived_by_the_family_count_as_carried(saved_sources):
    """ELECTRA's embedding_size becomes the selfattn embedding_size (None where it equals hidden_size): carried, so
    not in the report's list of fields left behind."""
    _, folder = saved_sources("electra", "Model")
    model, report = convert_checkpoint(folder)
    assert model.config.embedding_size == 16
    assert "embedding_size" not in report.config_not_carried
    assert "'embedding_size'" not in report.summary()
    _, folder = saved_sources("roberta", "Model")
    assert "max_position_embeddings" not in convert_checkpoint(folder)[1].config_not_carried


def tree(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_export_names_fitting_families_from_config_and_names_only(tmp_path, tiny_config_factory, monkeypatch):
    """The error naming the --family values that fit tries each family on the tensors' names and shapes alone (meta
    tensors): only the export asked for reads the stored tensors, and nothing is written."""
    exports = []
    export_state_dict = checkpoints.export_state_dict

    def recording(source, config, state_dict, family, progress=False):
        exports.append((family.name, not all(tensor.is_meta for tensor in state_dict.values())))
        return export_state_dict(source, config, state_dict, family, progress)

    monkeypatch.setattr(checkpoints, "export_state_dict", recording)
    SelfAttnForMaskedLM(tiny_config_factory("encoder")).save_pretrained(tmp_path / "mlm")
    before = tree(tmp_path)
    with pytest.raises(ConversionError, match="--family distilbert cannot take this model as it is; pass --family bert "
                       "or --family electra"):
        export_checkpoint(tmp_path / "mlm", "distilbert")
    assert [name for name, reads_values in exports if reads_values] == ["distilbert"]
    assert sorted(name for name, reads_values in exports if not reads_values) == sorted(
        name for name in ENCODER_FAMILIES if name != "distilbert"
    )
    assert tree(tmp_path) == before

    exports.clear()
    SelfAttnModel(tiny_config_factory("encoder", pre_layer_norm=True)).save_pretrained(tmp_path / "pre_ln")
    with pytest.raises(ConversionError, match="every --family refuses it:\nbert: .*pre_layer_norm=True"):
        export_checkpoint(tmp_path / "pre_ln")
    assert exports and not any(reads_values for _, reads_values in exports)


def test_unknown_architecture_names_the_supported_ones(saved_sources, tmp_path):
    config_dict, state_dict = bert_checkpoint(saved_sources)
    save_checkpoint(tmp_path, {**config_dict, "architectures": ["BertLMHeadModel"]}, state_dict)
    with pytest.raises(ConversionError, match="BertLMHeadModel.*BertForMaskedLM"):
        convert_checkpoint(tmp_path)


def test_unknown_model_type_names_the_supported_ones(tmp_path):
    save_checkpoint(tmp_path, {"model_type": "gpt2", "architectures": ["GPT2Model"]}, {})
    with pytest.raises(ConversionError, match="gpt2.*distilbert"):
        convert_checkpoint(tmp_path)
    with pytest.raises(ConversionError, match="gpt2"):
        SelfAttnConfig.from_pretrained(tmp_path)


def test_unused_and_missing_tensors_are_all_listed(saved_sources, tmp_path):
    config_dict, state_dict = bert_checkpoint(saved_sources)
    del state_dict["bert.encoder.layer.1.output.dense.weight"], state_dict["cls.predictions.bias"]
    state_dict["bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    save_checkpoint(tmp_path, config_dict, state_dict)
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(tmp_path)
    message = str(error.value)
    for name in (
        "unused source tensor bert.encoder.layer.0.attention.self.rotary.weight",
        "missing target tensor model.encoder.layers.1.ffn.fc2.weight",
        "missing target tensor lm_head.decoder.bias",
    ):
        assert name in message
    assert "3 problem(s)" in message


def test_other_head_in_checkpoint_needs_its_architecture(saved_sources, tmp_path):
    """bert-base-uncased names BertForMaskedLM but also holds the pooler and next-sentence head."""
    config_dict, state_dict = bert_checkpoint(saved_sources, "ForPreTraining")
    save_checkpoint(tmp_path, {**config_dict, "architectures": ["BertForMaskedLM"]}, state_dict)
    with pytest.raises(ConversionError, match="cls.seq_relationship.weight(.|\n)*BertForPreTraining"):
        convert_checkpoint(tmp_path)
    model, report = convert_checkpoint(tmp_path, architecture="BertForPreTraining")
    assert type(model).__name__ == "SelfAttnForPreTraining" and not report.problems()


def test_shape_mismatch_names_tensor_and_shapes(saved_sources, tmp_path):
    config_dict, state_dict = bert_checkpoint(saved_sources)
    save_checkpoint(tmp_path, {**config_dict, "intermediate_size": 40}, state_dict)
    with pytest.raises(ConversionError, match=r"bert.encoder.layer.0.intermediate.dense.weight \(37, 32\) -> "
                       r"model.encoder.layers.0.ffn.fc1.weight expects \(40, 32\)"):
        convert_checkpoint(tmp_path)


def test_pytorch_bin_with_legacy_names_and_buffers(saved_sources, tmp_path):
    """Old checkpoints: a .bin file, LayerNorm gamma/beta, position_ids buffers and the tied decoder saved twice."""
    source_model, folder = saved_sources("bert", "ForMaskedLM")
    state_dict = {}
    for name, tensor in source_model.state_dict().items():
        if name.endswith("LayerNorm.weight"):
            name = name.replace("LayerNorm.weight", "LayerNorm.gamma")
        elif name.endswith("LayerNorm.bias"):
            name = name.replace("LayerNorm.bias", "LayerNorm.beta")
        state_dict[name] = tensor.clone()
    state_dict["bert.embeddings.position_ids"] = torch.arange(MAX_POSITIONS)[None]
    tmp_path.joinpath("config.json").write_text((folder / "config.json").read_text())
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    model, report = convert_checkpoint(tmp_path)
    assert set(report.dropped) == {
        "bert.embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"
    }
    assert max(max_diffs(source_model, model, "BertForMaskedLM").values()) <= TOLERANCE


def test_sharded_checkpoint(saved_sources, tmp_path):
    source_model, _ = saved_sources("distilbert", "ForSequenceClassification")
    source_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _ = convert_checkpoint(tmp_path)
    assert max(max_diffs(source_model, model, "DistilBertForSequenceClassification").values()) <= TOLERANCE


def test_mlm_head_with_fixed_gelu_refuses_other_activation(tmp_path):
    config = source_config("electra", "ForMaskedLM", hidden_act="relu")
    random_source_model("ElectraForMaskedLM", config).save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="gelu whatever hidden_act is.*'relu'"):
        convert_checkpoint(tmp_path)


def test_export_refuses_what_the_family_cannot_express(tmp_path, tiny_config_factory):
    SelfAttnModel(tiny_config_factory("encoder", pre_layer_norm=True)).save_pretrained(tmp_path / "pre_ln")
    with pytest.raises(ConversionError, match="pre_layer_norm=True"):
        export_checkpoint(tmp_path / "pre_ln")
    SelfAttnForMaskedLM(tiny_config_factory("encoder")).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConversionError, match="type_vocab_size=2.*distilbert always has 0"):
        export_checkpoint(tmp_path / "bert", "distilbert")


# Converted models whose shape alone does not name their family: XLM-R has RoBERTa's shape, DistilBERT has no token
# types, ELECTRA an embedding projection and a discriminator head of its own.
HOMECOMING = [("xlm-roberta", "ForTokenClassification"), ("distilbert", "ForMaskedLM"), ("electra", "ForPreTraining"),
              ("electra", "ForMaskedLM")]


def converted_folder(saved_sources, model_type: str, suffix: str, folder: Path) -> Path:
    _, source = saved_sources(model_type, suffix)
    convert_checkpoint(source)[0].save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", HOMECOMING, ids=case_id)
def test_export_defaults_to_the_family_converted_from(case, saved_sources, tmp_path):
    model_type, suffix = case
    config, state_dict, _ = export_checkpoint(converted_folder(saved_sources, model_type, suffix, tmp_path))
    assert (config.model_type, config.architectures) == (model_type, [FAMILIES[model_type].architecture(suffix)])
    original = load_checkpoint(saved_sources(model_type, suffix)[1])
    assert sorted(state_dict) == sorted(original)
    assert all(torch.equal(state_dict[name], original[name]) for name in original)


@pytest.mark.parametrize("case", HOMECOMING[1:], ids=case_id)
def test_export_without_a_recorded_family_takes_the_first_that_fits(case, saved_sources, tmp_path):
    """A model converted by an older release (or trained from scratch) does not record its family."""
    model_type, suffix = case
    folder = converted_folder(saved_sources, model_type, suffix, tmp_path)
    config_dict = json.loads((folder / "config.json").read_text())
    config_dict.pop("source_model_type", None)
    (folder / "config.json").write_text(json.dumps(config_dict))
    assert export_checkpoint(folder)[0].model_type == model_type


def test_export_names_the_families_that_can_take_the_model(saved_sources, tmp_path, tiny_config_factory):
    SelfAttnForMaskedLM(tiny_config_factory("encoder")).save_pretrained(tmp_path / "mlm")
    with pytest.raises(ConversionError, match="--family distilbert cannot take this model as it is; pass --family bert "
                       "or --family electra"):
        export_checkpoint(tmp_path / "mlm", "distilbert")
    # A BERT model given a discriminator head: the family it was converted from has no such head.
    folder = converted_folder(saved_sources, "bert", "ForMaskedLM", tmp_path / "bert")
    SelfAttnForReplacedTokenDetection.from_pretrained(folder).save_pretrained(tmp_path / "discriminator")
    with pytest.raises(ConversionError, match=r"no bert counterpart(.|\n)*bert, the family it was converted from "
                       r"\(source_model_type in its config.json and export's default\), cannot take this model as it "
                       r"is; pass --family electra\."):
        export_checkpoint(tmp_path / "discriminator")
    SelfAttnModel(tiny_config_factory("encoder", pre_layer_norm=True)).save_pretrained(tmp_path / "pre_ln")
    with pytest.raises(ConversionError, match="--family roberta cannot take this model as it is; no other --family "
                       "takes it either"):
        export_checkpoint(tmp_path / "pre_ln", "roberta")
    with pytest.raises(ConversionError, match="every --family refuses it:\nbert: .*pre_layer_norm=True"):
        export_checkpoint(tmp_path / "pre_ln")


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_verify_without_a_tokenizer_keeps_the_sample_within_the_position_table(model_type, tmp_path):
    """Random ids stand in for text where the checkpoint has no tokenizer: rows of up to 12, cut to whole chunks of
    4 within the 10 positions (RoBERTa's table also holds the rows up to its padding row)."""
    config = source_config(model_type, chunk_size_feed_forward=4)
    config.max_position_embeddings = 10 + (config.pad_token_id + 1 if model_type == "roberta" else 0)
    random_source_model(FAMILIES[model_type].architecture("Model"), config).save_pretrained(tmp_path)
    model, _ = convert_checkpoint(tmp_path)
    assert max(checkpoints.verify(tmp_path, model).values()) <= TOLERANCE


def damage(folder, damaged: str) -> Path:
    """Spoil one file of a saved checkpoint as a cut-short download or a disk error would; the file's path."""
    if damaged == "safetensors cut short":
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[:200])
    elif damaged == "safetensors garbage":
        path = folder / "model.safetensors"
        path.write_bytes(b"\x00" * 64)
    elif damaged == "bin cut short":
        (folder / "model.safetensors").unlink()
        path = folder / "pytorch_model.bin"
        torch.save({"weight": torch.zeros(3)}, path)
        path.write_bytes(path.read_bytes()[:100])
    elif damaged == "config.json cut short":
        path = folder / "config.json"
        path.write_text(path.read_text()[:40])
    elif damaged == "index without weight_map":
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        path = folder / "model.safetensors.index.json"
        path.write_text(json.dumps({"metadata": {}}))
    else:
        raise ValueError(damaged)
    return path


DAMAGES = ["safetensors cut short", "safetensors garbage", "bin cut short", "config.json cut short",
           "index without weight_map"]


@pytest.mark.parametrize("damaged", DAMAGES)
def test_damaged_file_is_named_with_the_fix(damaged, saved_sources, tmp_path):
    """Not the reader's bare error (a SafetensorError does not say which file): the file, what is wrong, and
    what to do."""
    config_dict, state_dict = bert_checkpoint(saved_sources)
    save_checkpoint(tmp_path, config_dict, state_dict)
    path = damage(tmp_path, damaged)
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(tmp_path)
    message = str(error.value)
    assert str(path) in message and "re-download or re-save" in message, message


def test_no_weights_names_the_expected_files(tmp_path):
    tmp_path.joinpath("config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ConversionError, match="model.safetensors"):
        convert_checkpoint(tmp_path)


@pytest.mark.parametrize("model_type", ["bert", "electra"])
def test_pretraining_heads_give_the_source_loss(model_type, saved_sources):
    """SelfAttnForPreTraining (MLM + next sentence) and SelfAttnForReplacedTokenDetection follow transformers'
    losses and output names."""
    source_model, folder = saved_sources(model_type, "ForPreTraining")
    model, _ = convert_checkpoint(folder)
    inputs = padded_batch(source_model.config)
    batch, length = inputs["input_ids"].shape
    if model_type == "bert":
        labels = {"labels": inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100),
                  "next_sentence_label": torch.tensor([0, 1, 0])}
    else:
        labels = {"labels": (torch.arange(batch * length).view(batch, length) % 3 == 0).long()}
    with torch.no_grad():
        expected, actual = source_model(**inputs, **labels), model(**inputs, **labels)
    assert actual.loss is not None and abs(actual.loss.item() - expected.loss.item()) <= TOLERANCE
    assert list(actual.keys()) == list(expected.keys())


def test_pretraining_head_is_registered(tiny_encoder_config):
    model = transformers.AutoModelForPreTraining.from_config(tiny_encoder_config)
    assert type(model).__name__ == "SelfAttnForPreTraining"
    assert tiny_encoder_config.auto_map["AutoModelForPreTraining"] == "model.SelfAttnForPreTraining"


def test_encoder_decoder_warm_started_from_two_bert_checkpoints(saved_sources, tmp_path):
    encoder_model, encoder_folder = saved_sources("bert", "Model")
    decoder_model = random_source_model("BertModel", source_config("bert", num_hidden_layers=1), seed=1)
    decoder_model.save_pretrained(tmp_path / "decoder")
    model, info = warm_start_encoder_decoder(
        encoder_folder, tmp_path / "decoder", decoder_start_token_id=2, output_loading_info=True
    )
    assert (model.config.encoder_layers, model.config.decoder_layers) == (2, 1)
    cross_attention = [
        f"model.decoder.layers.0.{module}.{leaf}"
        for module in ("cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.o_proj", "cross_attn_layer_norm")
        for leaf in ("weight", "bias")
    ]
    # A BertModel checkpoint has no MLM head: BERT's LM-head transform and output bias start new.
    mlm_head = ["lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight", "lm_head.layer_norm.bias",
                "lm_head.decoder.bias"]
    assert sorted(info["missing_keys"]) == sorted(cross_attention + mlm_head)
    inputs = padded_batch(encoder_model.config)
    with torch.no_grad():
        expected = encoder_model(**inputs).last_hidden_state
        encoded = model.get_encoder()(**inputs).last_hidden_state
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    real_tokens = inputs["attention_mask"].bool()  # the encoder skips padding at inference
    assert (encoded - expected)[real_tokens].abs().max() <= TOLERANCE and torch.isfinite(loss)
    torch.testing.assert_close(  # a copied tensor: exact
        model.model.decoder.layers[0].ffn.fc1.weight, decoder_model.encoder.layer[0].intermediate.dense.weight,
        rtol=0, atol=0,
    )
    assert model.lm_head.decoder.weight is model.model.encoder.embeddings.word_embeddings.weight
    assert model.get_output_embeddings() is model.lm_head.decoder


def test_warm_start_keeps_the_decoder_checkpoints_mlm_head(saved_sources, tmp_path):
    source_model, folder = saved_sources("bert", "ForMaskedLM")
    model, info = warm_start_encoder_decoder(
        folder, decoder_start_token_id=2, output_loading_info=True
    )
    assert not [key for key in info["missing_keys"] if not key.startswith("model.decoder.layers.")]
    predictions = source_model.cls.predictions
    for ours, theirs in [
        (model.lm_head.dense, predictions.transform.dense), (model.lm_head.layer_norm, predictions.transform.LayerNorm)
    ]:
        torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=0)
        torch.testing.assert_close(ours.bias, theirs.bias, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.decoder.bias, predictions.bias, rtol=0, atol=0)
    # The head maps the last decoder states as BertForMaskedLM's head maps the encoder's. Computed by two models
    # from separately allocated copies of the weights, which fp32 GEMM need not round alike on every CPU: within
    # TOLERANCE, not bit for bit.
    states = torch.randn(2, 3, source_model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(states), predictions(states), rtol=0, atol=TOLERANCE)
    plain = warm_start_encoder_decoder(folder, lm_head_transform=False)
    assert isinstance(plain.lm_head, torch.nn.Linear)
    assert plain.lm_head.weight is plain.model.encoder.embeddings.word_embeddings.weight


def test_warm_start_says_it_leaves_an_untied_mlm_projection(saved_sources, tmp_path, caplog):
    source_model = random_source_model("BertForMaskedLM", source_config("bert", tie_word_embeddings=False))
    assert source_model.cls.predictions.decoder.weight is not source_model.bert.embeddings.word_embeddings.weight
    source_model.save_pretrained(tmp_path / "untied")
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        model = warm_start_encoder_decoder(tmp_path / "untied", decoder_start_token_id=2)
    assert "its MLM projection cls.predictions.decoder.weight is a matrix of its own" in caplog.text
    assert model.lm_head.decoder.weight is model.model.encoder.embeddings.word_embeddings.weight

    caplog.clear()
    _, tied = saved_sources("bert", "ForMaskedLM")
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        warm_start_encoder_decoder(tied, decoder_start_token_id=2)
    assert "MLM projection" not in caplog.text


def test_warm_start_refuses_checkpoints_of_different_shapes(saved_sources, tmp_path):

    _, encoder_folder = saved_sources("bert", "Model")
    random_source_model("BertModel", source_config("bert", intermediate_size=40)).save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="intermediate_size: 37 vs 40"):
        warm_start_encoder_decoder(encoder_folder, tmp_path)


def test_auto_class_with_selfattn_config_loads_bert_checkpoint(saved_sources):
    source_model, folder = saved_sources("bert", "ForTokenClassification")
    config = SelfAttnConfig.from_pretrained(folder)
    model = transformers.AutoModelForTokenClassification.from_pretrained(folder, config=config)
    assert type(model).__name__ == "SelfAttnForTokenClassification"
    assert max(max_diffs(source_model, model.eval(), "BertForTokenClassification").values()) <= TOLERANCE


def test_export_refuses_a_foreign_folder(saved_sources):
    _, folder = saved_sources("bert", "Model")
    with pytest.raises(ConversionError, match="'bert' checkpoint, not a selfattn one"):
        export_checkpoint(folder)


# ----------------------------------------------------------------------------------------------------------------
# from_pretrained's file-selection arguments on a BERT-family folder: the weights transformers' own class reads.


class PickledStateDict(dict):
    """A state dict torch.load reads only with weights_only=False (an arbitrary class, as old checkpoints hold)."""


def two_bert_models():
    """Two BertModels of one tiny config with different weights: which file was read shows in the outputs."""
    config = source_config("bert")
    return random_source_model("BertModel", config, seed=0), random_source_model("BertModel", config, seed=1)


def assert_loads_as_bert_model(folder, expected, model_class=SelfAttnModel, **kwargs):
    """transformers' BertModel and `model_class` read `folder` with `kwargs` to the same weights: those of
    `expected` (a BertModel), with nothing missing or unexpected."""
    reference = transformers.BertModel.from_pretrained(folder, **kwargs).eval()
    assert max(max_diffs(expected, reference, "BertModel").values()) <= TOLERANCE  # the file meant
    model, info = model_class.from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    diffs = max_diffs(reference, model.eval(), "BertModel")
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_from_pretrained_reads_a_subfolder(tmp_path):
    first, second = two_bert_models()
    second.save_pretrained(tmp_path)  # a checkpoint at the top, which subfolder= must not read
    first.save_pretrained(tmp_path / "text_encoder")
    assert_loads_as_bert_model(tmp_path, first, subfolder="text_encoder")
    assert_loads_as_bert_model(tmp_path, second)


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_from_pretrained_reads_the_variant(sharded, tmp_path):
    first, second = two_bert_models()
    shards = {"max_shard_size": "20KB"} if sharded else {}
    first.save_pretrained(tmp_path, **shards)
    second.save_pretrained(tmp_path, variant="v2", **shards)
    index = "model.safetensors.index.v2.json" if sharded else "model.v2.safetensors"
    assert (tmp_path / index).is_file()
    assert_loads_as_bert_model(tmp_path, second, variant="v2")
    assert_loads_as_bert_model(tmp_path, first)


def test_from_pretrained_use_safetensors_picks_the_format(tmp_path):
    first, second = two_bert_models()
    first.save_pretrained(tmp_path)  # model.safetensors
    torch.save(second.state_dict(), tmp_path / "pytorch_model.bin")
    assert_loads_as_bert_model(tmp_path, second, use_safetensors=False)
    assert_loads_as_bert_model(tmp_path, first, use_safetensors=True)
    assert_loads_as_bert_model(tmp_path, first)


def variant_only(folder, model):
    model.save_pretrained(folder, variant="fp16")


def pytorch_only(folder, model):
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


# (how the folder is saved, from_pretrained's arguments, what the error must say)
UNREADABLE_CHOICES = {
    "use_safetensors=True, PyTorch weights only": (pytorch_only, {"use_safetensors": True}, "use_safetensors=None"),
    "use_safetensors=False, safetensors only": (
        lambda folder, model: model.save_pretrained(folder), {"use_safetensors": False}, "use_safetensors=None"
    ),
    "variant absent": (lambda folder, model: model.save_pretrained(folder), {"variant": "fp16"}, "variant=None"),
    "variant weights only": (variant_only, {}, "variant='fp16'"),
}


@pytest.mark.parametrize("case", UNREADABLE_CHOICES, ids=list(UNREADABLE_CHOICES))
def test_weights_transformers_would_not_read_are_refused_with_the_fix(case, tmp_path):
    """Where transformers' class finds no weight file for the arguments, neither does selfattn's, and the error
    says which other choice finds one, rather than read a file the arguments rule out."""
    save, kwargs, advice = UNREADABLE_CHOICES[case]
    save(tmp_path, two_bert_models()[0])
    with pytest.raises(OSError):
        transformers.BertModel.from_pretrained(tmp_path, **kwargs)
    with pytest.raises(ConversionError, match="No weights in") as error:
        SelfAttnModel.from_pretrained(tmp_path, **kwargs)
    assert advice in str(error.value), error.value


def test_from_pretrained_weights_only_false_reads_a_pickled_checkpoint(tmp_path):
    """weights_only as from_pretrained documents it: False lets torch.load unpickle what it holds. (transformers
    5.24's own classes pass it only to their dtype probe and read the weights with weights_only=True whatever
    it says, so BertModel is no reference here: the saved model is.)"""
    first, _ = two_bert_models()
    pytorch_only(tmp_path, first)
    torch.save(PickledStateDict(first.state_dict()), tmp_path / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="weights_only=True"):
        SelfAttnModel.from_pretrained(tmp_path)
    model, info = SelfAttnModel.from_pretrained(tmp_path, weights_only=False, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert max(max_diffs(first, model.eval(), "BertModel").values()) <= TOLERANCE


def test_from_pretrained_key_mapping_renames_the_checkpoints_names(tmp_path):
    first, _ = two_bert_models()
    first.save_pretrained(tmp_path)
    renamed = {name.replace("encoder.layer.", "blocks."): tensor for name, tensor in first.state_dict().items()}
    save_file({name: tensor.contiguous() for name, tensor in renamed.items()}, tmp_path / "model.safetensors")
    assert_loads_as_bert_model(tmp_path, first, key_mapping={r"^blocks\.": "encoder.layer."})
    with pytest.raises(ConversionError, match="key_mapping="):
        SelfAttnModel.from_pretrained(tmp_path, key_mapping=[("blocks", "encoder.layer")])


def test_from_pretrained_reads_the_weights_config_json_names(tmp_path):
    first, second = two_bert_models()
    first.save_pretrained(tmp_path)
    tuned = {name: tensor.contiguous() for name, tensor in second.state_dict().items()}
    save_file(tuned, tmp_path / "tuned.safetensors")
    config_path = tmp_path / "config.json"
    config_dict = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config_dict, "transformers_weights": "tuned.safetensors"}))
    assert_loads_as_bert_model(tmp_path, second)


@pytest.mark.parametrize("kwargs", [{"gguf_file": "model.gguf"}, {"from_tf": True}, {"from_flax": True}], ids=str)
def test_formats_not_converted_from_are_refused(kwargs, saved_sources):
    _, folder = saved_sources("bert", "Model")
    (name, value), = kwargs.items()
    with pytest.raises(ConversionError, match=f"{name}={value!r}.*Leave out {name}"):
        SelfAttnModel.from_pretrained(folder, **kwargs)


def test_hub_checkpoint_in_a_subfolder(tmp_path, monkeypatch):
    """A Hub id with subfolder=: config.json and the weights are fetched from the subfolder, and only from it."""
    import huggingface_hub
    import transformers.utils

    first, second = two_bert_models()
    repository = tmp_path / "snapshot"
    second.save_pretrained(repository)
    first.save_pretrained(repository / "text_encoder")
    requested = []

    def cached_file(repo_id, filename, subfolder="", **kwargs):
        assert repo_id == "org/model"
        path = repository / subfolder / filename
        return str(path) if path.is_file() else None

    def snapshot_download(repo_id, allow_patterns, **kwargs):
        assert repo_id == "org/model"
        requested.extend(allow_patterns)
        return str(repository)

    monkeypatch.setattr(transformers.utils, "cached_file", cached_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = SelfAttnModel.from_pretrained("org/model", subfolder="text_encoder")
    assert requested and all(pattern.startswith("text_encoder/") for pattern in requested), requested
    assert max(max_diffs(first, model.eval(), "BertModel").values()) <= TOLERANCE
    torch.save(second.state_dict(), repository / "text_encoder" / "pytorch_model.bin")
    requested.clear()
    model = SelfAttnModel.from_pretrained("org/model", subfolder="text_encoder", use_safetensors=False)
    assert "text_encoder/*.bin" in requested and "text_encoder/*.safetensors" not in requested, requested
    assert max(max_diffs(second, model.eval(), "BertModel").values()) <= TOLERANCE


# --- dtypes ---------------------------------------------------------------------------------------------------------


def test_verify_leaves_a_half_precision_model_in_its_dtype(saved_sources, tmp_path):
    """--verify runs both models in float32; the converted model, saved afterwards, keeps the source's bfloat16
    tensors bit for bit (it was upcast in place, and saved as float32 twice the size)."""
    config_dict, state_dict = bert_checkpoint(saved_sources)
    source = tmp_path / "bf16"
    halves = {name: tensor.to(torch.bfloat16) for name, tensor in state_dict.items()}
    save_checkpoint(source, {**config_dict, "dtype": "bfloat16"}, halves)
    model, report = convert_checkpoint(source)
    assert model.dtype == torch.bfloat16 and report.dtype == "bfloat16 (the source tensors' own)"
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    diffs = checkpoints.verify(source, model)
    assert max(diffs.values()) <= TOLERANCE
    after = model.state_dict()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    assert model.model.encoder.embeddings.word_embeddings.weight is model.get_output_embeddings().weight  # still tied


def test_mixed_dtypes_are_kept_in_one_that_holds_them_all(saved_sources, tmp_path):
    config_dict, state_dict = bert_checkpoint(saved_sources)
    halves = {
        name: tensor.to(torch.float16 if "attention" in name else torch.bfloat16) for name, tensor in state_dict.items()
    }
    save_checkpoint(tmp_path / "mixed", config_dict, halves)
    model, report = convert_checkpoint(tmp_path / "mixed")
    assert model.dtype == torch.float32
    assert report.dtype == "float32 (it holds each of the source tensors' dtypes (bfloat16, float16) exactly)"
    converted = model.state_dict()
    for source_name, target_name in report.mapped.items():
        assert torch.equal(converted[target_name], halves[source_name].float())


# transformers 5 ties an MLM head's own bias to its decoder's, and BART's and Marian's `shared` table to the stacks'
# embed_tokens, only where tie_word_embeddings=True; untied and trained, the copies differ, and its forward reads the
# decoder's bias and the stacks' own tables.
UNTIED_MLM = [("bert", "ForMaskedLM", "cls.predictions"), ("roberta", "ForMaskedLM", "lm_head"),
              ("bert", "ForPreTraining", "cls.predictions")]


@pytest.mark.parametrize("model_type, suffix, head", UNTIED_MLM, ids=[f"{t}-{s}" for t, s, _ in UNTIED_MLM])
def test_untied_mlm_whose_two_biases_differ_converts_the_one_transformers_adds(model_type, suffix, head, tmp_path):
    architecture = FAMILIES[model_type].architecture(suffix)
    source_model = random_source_model(architecture, source_config(model_type, suffix, tie_word_embeddings=False))
    state = source_model.state_dict()
    assert not torch.equal(state[f"{head}.bias"], state[f"{head}.decoder.bias"])  # as after training
    source_model.save_pretrained(tmp_path)
    model, report = convert_checkpoint(tmp_path)
    assert f"it differs from {head}.decoder.bias, which transformers' model reads" in report.dropped[f"{head}.bias"]
    assert max(max_diffs(source_model, model, architecture).values()) <= TOLERANCE
    loaded = type(model).from_pretrained(tmp_path).eval()  # from_pretrained follows the same rule
    assert max(max_diffs(source_model, loaded, architecture).values()) <= TOLERANCE


def untied_bart(folder: Path, same: tuple[str, ...] = ()):
    """A BartForConditionalGeneration with tie_word_embeddings=False, all four token tables random (as after
    training) but those `same` names ("decoder", "shared"), which are set to the encoder's table; saved in `folder`."""
    config = transformers.BartConfig(
        vocab_size=VOCAB_SIZE, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=MAX_POSITIONS,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, tie_word_embeddings=False,
    )
    model = random_source_model("BartForConditionalGeneration", config)
    tables = {"shared": model.model.shared, "decoder": model.model.decoder.embed_tokens}
    with torch.no_grad():
        for name in same:
            tables[name].weight.copy_(model.model.encoder.embed_tokens.weight)
    model.save_pretrained(folder)
    return model


def seq2seq_logits_diff(reference, model) -> float:
    generator = torch.Generator().manual_seed(2)
    inputs = {
        "input_ids": torch.randint(3, VOCAB_SIZE, (2, 9), generator=generator),
        "decoder_input_ids": torch.randint(3, VOCAB_SIZE, (2, 6), generator=generator),
    }
    with torch.no_grad():
        return (reference(**inputs).logits - model.eval()(**inputs).logits).abs().max().item()


def test_untied_bart_whose_shared_table_alone_differs_converts_the_tables_transformers_reads(tmp_path):
    source_model = untied_bart(tmp_path, same=("decoder",))
    model, report = convert_checkpoint(tmp_path)
    assert "which transformers' encoder and decoder do not read" in report.dropped["model.shared.weight"]
    assert seq2seq_logits_diff(source_model, model) <= TOLERANCE
    loaded = type(model).from_pretrained(tmp_path)  # not the shared table, which comes last in the file
    assert seq2seq_logits_diff(source_model, loaded) <= TOLERANCE


@pytest.mark.parametrize("same", [("shared",), ()], ids=["decoder-table-differs", "all-tables-differ"])
def test_untied_bart_whose_decoder_table_differs_is_refused_both_ways(same, tmp_path):
    """selfattn has one token table for both stacks: converting or loading the checkpoint would lose one of them."""
    untied_bart(tmp_path, same=same)
    for load in (convert_checkpoint, checkpoints.target_class("SelfAttnForConditionalGeneration").from_pretrained):
        with pytest.raises(ConversionError) as error:
            load(tmp_path)
        message = str(error.value)
        assert "'model.decoder.embed_tokens.weight'" in message and "'model.encoder.embed_tokens.weight'" in message
        assert "as one tensor" in message and "cannot be converted" in message
        if not same:  # `shared` is said not to be among them, and why
            assert "model.shared.weight is left out" in message and "do not read" in message


def test_decoding_settings_kept_in_config_json_reach_the_generation_config(tmp_path):
    """Checkpoints older than generation_config.json keep their decoding settings in config.json, where
    transformers' from_pretrained reads them."""
    config = transformers.MarianConfig(
        vocab_size=VOCAB_SIZE, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=MAX_POSITIONS,
        pad_token_id=VOCAB_SIZE - 1, eos_token_id=0, decoder_start_token_id=VOCAB_SIZE - 1,
    )
    torch.manual_seed(0)
    transformers.MarianMTModel(config).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    settings = {"num_beams": 4, "max_length": 40, "bad_words_ids": [[VOCAB_SIZE - 1]], "length_penalty": 0.6}
    config_dict = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config_dict, **settings}))
    model, report = convert_checkpoint(tmp_path)
    theirs = transformers.MarianMTModel.from_pretrained(tmp_path).generation_config
    assert {name: getattr(theirs, name) for name in settings} == settings
    assert {name: getattr(model.generation_config, name) for name in settings} == settings
    assert set(settings) <= set(report.decoding_from_config)
    assert "decoding settings read from config.json" in report.summary()


def test_problems_end_before_the_advice(saved_sources, tmp_path):
    config_dict, state_dict = bert_checkpoint(saved_sources)
    state_dict["bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    save_checkpoint(tmp_path, config_dict, state_dict)
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(tmp_path)
    assert "no bert rule maps it.\nIf the checkpoint holds another head, pass its architecture" in str(error.value)


def test_export_names_what_a_copied_tensor_copies(tmp_path):
    """An untied RoBERTa MLM: selfattn has one decoder bias, which RoBERTa's model holds under two names."""
    source_model = random_source_model(
        "RobertaForMaskedLM", source_config("roberta", "ForMaskedLM", tie_word_embeddings=False)
    )
    source_model.save_pretrained(tmp_path / "roberta")
    convert_checkpoint(tmp_path / "roberta")[0].save_pretrained(tmp_path / "selfattn")
    _, state_dict, report = export_checkpoint(tmp_path / "selfattn")
    assert report.computed["lm_head.decoder.bias"] == (
        "a copy of lm_head.bias (both hold the selfattn model's lm_head.decoder.bias)"
    )
    assert torch.equal(state_dict["lm_head.bias"], source_model.state_dict()["lm_head.decoder.bias"])


def test_export_says_which_config_fields_take_the_family_defaults(saved_sources, tmp_path):
    """The DistilBERT fields no selfattn field holds are written back as recorded; a model without the record (an
    older release's conversion) has them written with the family's defaults."""
    folder = converted_folder(saved_sources, "distilbert", "ForMaskedLM", tmp_path)
    _, _, report = export_checkpoint(folder)
    assert report.config_written_back == ["qa_dropout", "sinusoidal_pos_embds"] and not report.config_defaulted
    assert "written back as the conversion recorded them" in report.summary()
    assert "defaults" not in report.summary()
    config_dict = json.loads((folder / "config.json").read_text())
    del config_dict["source_config"]
    (folder / "config.json").write_text(json.dumps(config_dict))
    _, _, report = export_checkpoint(folder)
    assert report.config_defaulted == ["qa_dropout", "sinusoidal_pos_embds"] and not report.config_written_back
    assert "written with the family's defaults" in report.summary()


# --- config.json fields no selfattn field holds: kept in source_config, written back by export -----------------------

# Per family, non-default values of fields that no selfattn field holds, and one a user added to config.json. ELECTRA's
# summary_* fields only matter to ElectraForMultipleChoice, not to the bare model converted here.
UNUSED_SOURCE_FIELDS = {
    "bert": {"finetuning_task": "sst2", "users_field": {"notes": ["kept", 1, None]}},
    "roberta": {"users_field": 3.5},
    "xlm-roberta": {"users_field": [1, 2]},
    "distilbert": {"qa_dropout": 0.25, "sinusoidal_pos_embds": True, "users_field": "kept"},
    "electra": {
        "summary_type": "last", "summary_use_proj": False, "summary_activation": "tanh", "summary_last_dropout": 0.3,
    },
}


def source_with_unused_fields(model_type: str, suffix: str, folder: Path, **fields) -> Path:
    """A saved random model of the family with UNUSED_SOURCE_FIELDS (or `fields`) in its config.json, and a
    tokenizer_config.json naming the tokenizer class, so that the conversion adds no tokenizer_class to the config."""
    family = FAMILIES[model_type]
    config = source_config(model_type, suffix, **(fields or UNUSED_SOURCE_FIELDS[model_type]))
    random_source_model(family.architecture(suffix), config).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": family.tokenizer_class}))
    return folder


def exported_config_json(selfattn_folder: Path, folder: Path, family: str | None = None) -> tuple[dict, object]:
    """(config.json as export writes it, less transformers_version, the export report)."""
    config, _, report = export_checkpoint(selfattn_folder, family)
    config.save_pretrained(folder)
    return config_json(folder), report


def config_json(folder: Path) -> dict:
    """The folder's config.json, less transformers' record of the version that wrote it."""
    config_dict = json.loads((folder / "config.json").read_text())
    del config_dict["transformers_version"]
    return config_dict


def written_for_tools(model_type: str) -> dict:
    """What export adds to a family's config.json: position_embedding_type="absolute", no longer a field of
    transformers' BERT-layout configs, stays for tools that read it (CTranslate2's converter); DistilBERT never had
    it."""
    required = FAMILIES[model_type].config_requirements
    return {"position_embedding_type": "absolute"} if "position_embedding_type" in required else {}


@pytest.mark.parametrize("route", ["convert_checkpoint", "from_pretrained"])
@pytest.mark.parametrize("model_type", sorted(ENCODER_FAMILIES))
def test_config_json_comes_back_whole_from_convert_and_export(model_type, route, tmp_path):
    """Fields no selfattn field holds (DistilBERT's qa_dropout, ELECTRA's summary_* for the bare model, a field a user
    added) are kept in the selfattn config's source_config and written back: the exported config.json is the
    source's."""
    source = source_with_unused_fields(model_type, "Model", tmp_path / "source")
    unused = UNUSED_SOURCE_FIELDS[model_type]
    if route == "convert_checkpoint":
        model, report = convert_checkpoint(source)
        assert set(unused) <= set(report.config_kept_for_export) and not report.config_not_carried
        assert "kept for export" in report.summary() and "not carried" not in report.summary()
    else:
        model = SelfAttnModel.from_pretrained(source)  # translated while loading
    assert model.config.source_config.items() >= unused.items()
    model.save_pretrained(tmp_path / "selfattn")
    assert config_json(tmp_path / "selfattn")["source_config"].items() >= unused.items()
    exported, report = exported_config_json(tmp_path / "selfattn", tmp_path / "exported")
    assert exported == {**config_json(source), **written_for_tools(model_type)}
    assert set(unused) <= set(report.config_written_back) and not report.config_defaulted


def test_electra_multiple_choice_summary_fields_are_mapped_or_refused(tmp_path):
    """ElectraForMultipleChoice's sequence summary reads summary_* fields. summary_last_dropout is the dropout before
    its classifier, selfattn's classifier_dropout (ELECTRA's own classifier_dropout is then no input to this head);
    summary_first_dropout, which ElectraConfig does not declare but the summary reads where present, is a dropout
    before the summary's dense that selfattn's pooler lacks: refused unless 0."""
    fields = dict(summary_last_dropout=0.3, summary_activation="tanh", summary_first_dropout=0, classifier_dropout=0.2)
    source = source_with_unused_fields("electra", "ForMultipleChoice", tmp_path / "electra", **fields)
    source_model = transformers.ElectraForMultipleChoice.from_pretrained(source)
    model, report = convert_checkpoint(source)
    assert model.dropout.p == source_model.sequence_summary.last_dropout.p == 0.3
    assert model.config.pooler_activation == "tanh"
    assert model.config.source_config == {"classifier_dropout": 0.2, "summary_first_dropout": 0}
    model.save_pretrained(tmp_path / "selfattn")
    exported, _ = exported_config_json(tmp_path / "selfattn", tmp_path / "exported")
    assert exported == {**config_json(source), **written_for_tools("electra")}

    config_dict = config_json(source)
    (source / "config.json").write_text(json.dumps({**config_dict, "summary_first_dropout": 0.1}))
    with pytest.raises(ConversionError, match=r"summary_first_dropout=0\.1 \(selfattn needs 0\)"):
        convert_checkpoint(source)


def test_electra_multiple_choice_export_writes_the_classifier_dropout_as_a_number(tmp_path, tiny_config_factory):
    """selfattn's classifier_dropout=None means hidden_dropout_prob; ElectraForMultipleChoice's summary_last_dropout
    takes a number, so export writes that one and the exported model drops out as much before its classifier."""
    config = tiny_config_factory("encoder", classifier_dropout=None, hidden_dropout_prob=0.15)
    SelfAttnForMultipleChoice(config).save_pretrained(tmp_path / "selfattn")
    exported, _ = exported_config_json(tmp_path / "selfattn", tmp_path / "exported", "electra")
    assert exported["summary_last_dropout"] == 0.15


def test_recorded_fields_never_override_the_ones_selfattn_holds(tmp_path):
    """An ElectraModel's summary fields are kept for export, but a multiple-choice head built on it computes its
    summary as selfattn does (first token, a dense, pooler_activation): export writes those, whatever the record says;
    and a field selfattn holds, written into the record by hand, does not replace selfattn's value."""
    source = source_with_unused_fields("electra", "Model", tmp_path / "electra")
    model = SelfAttnForMultipleChoice.from_pretrained(source)
    model.config.source_config["hidden_size"] = 64
    model.save_pretrained(tmp_path / "selfattn")
    exported, report = exported_config_json(tmp_path / "selfattn", tmp_path / "exported")
    assert exported["architectures"] == ["ElectraForMultipleChoice"]
    assert (exported["summary_type"], exported["summary_use_proj"]) == ("first", True)  # recorded: "last", False
    assert exported["summary_activation"] == model.config.pooler_activation
    assert exported["summary_last_dropout"] == model.dropout.p
    assert exported["hidden_size"] == 32
    assert not {"summary_type", "summary_use_proj", "hidden_size"} & set(report.config_written_back)
    # Each recorded field is in one report list: replaced ones too (they were in none).
    replaced = report.config_recorded_but_replaced
    assert {"summary_type", "summary_use_proj", "hidden_size"} <= set(replaced)
    assert not set(replaced) & set(report.config_written_back)
    assert set(replaced) | set(report.config_written_back) == set(model.config.source_config)
    assert "written with the selfattn model's own values instead" in report.summary()


def test_export_to_another_family_leaves_the_recorded_fields_out(tmp_path):
    """The record describes the source family's config: --family roberta for an XLM-R model writes none of it, and
    neither does the export that, without source_model_type (removed by hand), takes the first family that fits."""
    source = source_with_unused_fields("xlm-roberta", "Model", tmp_path / "xlm-roberta")
    convert_checkpoint(source)[0].save_pretrained(tmp_path / "selfattn")
    exported, report = exported_config_json(tmp_path / "selfattn", tmp_path / "exported", "roberta")
    assert exported["model_type"] == "roberta" and "users_field" not in exported
    assert report.config_recorded_for_another_family == ["users_field"] and not report.config_written_back
    assert "config fields source_config recorded for export to another family" in report.summary()
    config_dict = json.loads((tmp_path / "selfattn" / "config.json").read_text())
    del config_dict["source_model_type"]
    (tmp_path / "selfattn" / "config.json").write_text(json.dumps(config_dict))
    exported, report = exported_config_json(tmp_path / "selfattn", tmp_path / "exported", None)
    assert exported["model_type"] == "roberta" and "users_field" not in exported
    assert report.config_recorded_for_another_family == ["users_field"]


def test_fields_naming_files_of_the_source_folder_are_not_carried(saved_sources, tmp_path):
    """auto_map names the source's code files and transformers_weights its weights file, which the conversion does not
    copy: kept for export, they would send the exported folder's loader to files it lacks."""
    config_dict, state_dict = bert_checkpoint(saved_sources, "Model")
    folder_fields = {"auto_map": {"AutoModel": "modeling_mine.MyBert"}, "transformers_weights": "model.safetensors"}
    save_checkpoint(tmp_path / "bert", {**config_dict, **folder_fields, "users_field": 1}, state_dict)
    model, report = convert_checkpoint(tmp_path / "bert")
    assert report.config_not_carried == ["auto_map", "transformers_weights"]
    assert model.config.source_config == {"users_field": 1}
    assert "not carried over (they name files of the source folder" in report.summary()


def test_warm_start_records_no_source_config(tmp_path):
    """The warm-started encoder-decoder has no family (source_model_type None), so the encoder checkpoint's record goes
    too."""
    source = source_with_unused_fields("bert", "Model", tmp_path / "bert")
    assert SelfAttnModel.from_pretrained(source).config.source_config is not None
    model = warm_start_encoder_decoder(source, decoder_start_token_id=2)
    assert (model.config.source_model_type, model.config.source_config) == (None, None)
