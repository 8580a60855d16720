"""SelfAttnConfig: every field survives each serialisation route, the standard attribute names answer, and
impossible configs fail at creation with a ValueError that names the field."""

import json

import pytest
from conftest import make_tiny_config
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoConfig

from modeling_selfattn import SelfAttnConfig, SelfAttnForMaskedLM, SelfAttnModel

# A non-default value for every field SelfAttnConfig declares (plus a few inherited ones), so that a
# field dropped by any serialisation route shows up as a difference.
NON_DEFAULT_FIELDS = dict(
    vocab_size=101,
    hidden_size=48,
    num_attention_heads=6,
    encoder_layers=3,
    decoder_layers=2,
    intermediate_size=50,
    hidden_act="relu",
    hidden_dropout_prob=0.2,
    attention_dropout=0.3,
    activation_dropout=0.15,
    classifier_dropout=0.25,
    max_position_embeddings=40,
    position_embedding_type="sinusoidal",
    position_offset=2,
    padding_aware_positions=True,
    type_vocab_size=0,
    embedding_size=24,
    embedding_layer_norm=False,
    scale_embedding=True,
    pre_layer_norm=True,
    layer_norm_eps=1e-5,
    add_pooling_layer=False,
    pooler_activation="gelu",
    add_final_logits_bias=True,
    lm_head_transform=True,
    initializer_range=0.05,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=[2, 3],
    decoder_start_token_id=2,
    tie_word_embeddings=False,
    use_cache=False,
    pruned_heads={"encoder.1": [0, 5], "decoder.0.cross_attn": [2]},
    source_model_type="marian",
    source_config={"decoder_layerdrop": 0.1, "users_field": {"notes": ["kept", 1, None]}},
    # inherited from PreTrainedConfig
    id2label={0: "neg", 1: "neutral", 2: "pos"},
    problem_type="single_label_classification",
    output_hidden_states=True,
)


def assert_same_fields(loaded: SelfAttnConfig, original: SelfAttnConfig) -> None:
    for name, value in NON_DEFAULT_FIELDS.items():
        assert getattr(loaded, name) == value, name
    assert loaded.is_encoder_decoder == original.is_encoder_decoder
    assert loaded.num_hidden_layers == original.num_hidden_layers
    # where it was loaded from is the only thing allowed to differ
    assert {**loaded.to_dict(), "_name_or_path": ""} == {**original.to_dict(), "_name_or_path": ""}


def test_non_default_fields_cover_every_declared_field():
    declared = set(SelfAttnConfig.__annotations__) - {"model_type", "keys_to_ignore_at_inference"}
    assert declared <= set(NON_DEFAULT_FIELDS), f"add a non-default value for {declared - set(NON_DEFAULT_FIELDS)}"
    defaults = SelfAttnConfig()
    for name in declared:
        assert getattr(defaults, name) != NON_DEFAULT_FIELDS[name], f"{name} value equals its default"


def round_trip_dict(config, tmp_path):
    return SelfAttnConfig.from_dict(config.to_dict())


def round_trip_json_file(config, tmp_path):
    path = tmp_path / "config.json"
    config.to_json_file(path)
    json.loads(path.read_text())  # valid JSON, not a repr
    return SelfAttnConfig.from_json_file(path)


def round_trip_pretrained(config, tmp_path):
    config.save_pretrained(tmp_path)
    return SelfAttnConfig.from_pretrained(tmp_path)


def round_trip_auto_config(config, tmp_path):
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is SelfAttnConfig
    return loaded


@pytest.mark.parametrize(
    "round_trip", [round_trip_dict, round_trip_json_file, round_trip_pretrained, round_trip_auto_config]
)
def test_every_field_round_trips(round_trip, tmp_path):
    config = SelfAttnConfig(**NON_DEFAULT_FIELDS)
    assert_same_fields(round_trip(config, tmp_path), config)


def test_saved_config_names_the_remote_code_classes(tmp_path):
    SelfAttnConfig().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "selfattn"
    assert saved["auto_map"]["AutoConfig"] == "config.SelfAttnConfig"
    assert saved["auto_map"]["AutoModelForMaskedLM"] == "model.SelfAttnForMaskedLM"


@pytest.mark.parametrize(
    ("layers", "main_depth", "is_encoder_decoder"),
    [
        ({"encoder_layers": 3, "decoder_layers": 0}, 3, False),
        ({"encoder_layers": 3, "decoder_layers": 5}, 3, True),
        ({"encoder_layers": 0, "decoder_layers": 5}, 5, False),
    ],
    ids=["encoder", "encoder_decoder", "decoder"],
)
def test_standard_attribute_names_answer(layers, main_depth, is_encoder_decoder):
    config = SelfAttnConfig(vocab_size=77, hidden_size=64, num_attention_heads=8, intermediate_size=128, **layers)
    assert config.num_hidden_layers == main_depth
    assert config.is_encoder_decoder is is_encoder_decoder
    assert (config.vocab_size, config.hidden_size, config.num_attention_heads, config.intermediate_size) == (
        77,
        64,
        8,
        128,
    )
    assert config.head_dim == 8

    config.num_hidden_layers = 7
    assert config.num_hidden_layers == 7
    # the other stack keeps its depth
    other_stack = "decoder_layers" if layers["encoder_layers"] > 0 else "encoder_layers"
    assert getattr(config, other_stack) == layers[other_stack]


@pytest.mark.parametrize(
    ("layers", "expected"),
    [({}, {"encoder_layers": 4}), ({"encoder_layers": 0, "decoder_layers": 1}, {"decoder_layers": 4})],
    ids=["encoder", "decoder"],
)
def test_num_hidden_layers_keyword_sets_the_main_stack(layers, expected):
    config = SelfAttnConfig(num_hidden_layers=4, **layers)
    for name, value in expected.items():
        assert getattr(config, name) == value
    assert config.num_hidden_layers == 4
    assert "num_hidden_layers" not in config.to_dict()  # derived, so never saved twice


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "num_attention_heads"),
        ({"hidden_act": "swishy"}, "hidden_act"),
        ({"pooler_activation": "swishy"}, "pooler_activation"),
        ({"position_embedding_type": "rotary"}, "position_embedding_type"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"vocab_size": -5}, "vocab_size"),
        ({"hidden_size": -32}, "hidden_size"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"intermediate_size": -1}, "intermediate_size"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"encoder_layers": -1}, "encoder_layers"),
        ({"decoder_layers": -2}, "decoder_layers"),
        ({"type_vocab_size": -1}, "type_vocab_size"),
        ({"position_offset": -1}, "position_offset"),
        ({"embedding_size": 0}, "embedding_size"),
        ({"encoder_layers": 0, "decoder_layers": 0}, "encoder_layers"),
        ({"num_hidden_layers": 0}, "encoder_layers"),
        ({"position_embedding_type": "sinusoidal", "hidden_size": 33, "num_attention_heads": 3}, "hidden_size"),
        ({"position_embedding_type": "sinusoidal", "embedding_size": 15}, "embedding_size"),
        ({"padding_aware_positions": True, "position_offset": 0}, "position_offset"),
        ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
        ({"classifier_dropout": -0.1}, "classifier_dropout"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"chunk_size_feed_forward": 2.5}, "chunk_size_feed_forward"),
        ({"chunk_size_feed_forward": True}, "chunk_size_feed_forward"),
        ({"padding_aware_positions": True, "position_offset": 1, "pad_token_id": None}, "needs pad_token_id"),
        ({"initializer_range": -0.02}, "initializer_range"),
        ({"problem_type": "classification"}, "problem_type"),
        ({"num_labels": -1}, "num_labels"),
        ({"num_labels": 0}, "num_labels"),
        ({"add_cross_attention": True}, r"add_cross_attention=True\) with encoder_layers=12 and decoder_layers=0"),
        ({"add_cross_attention": True, "encoder_layers": 0, "decoder_layers": 2}, "add_cross_attention"),
        ({"is_encoder_decoder": True}, r"is_encoder_decoder=True\) with encoder_layers=12 and decoder_layers=0"),
        ({"source_config": {1: 0.1}}, r"source_config keys are config\.json field names"),
        ({"source_config": {"field": {1, 2}}}, r"source_config\['field'\] = \{1, 2\} is not a JSON value"),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None,
)
def test_impossible_config_raises_value_error_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=named):
        SelfAttnConfig(**fields)


def test_fields_refused_where_the_shape_lacks_them_are_accepted_where_it_has_them():
    # BertModel builds cross-attention for add_cross_attention=True; only selfattn's encoder-decoder shape has it.
    encoder_decoder = dict(vocab_size=99, hidden_size=32, num_attention_heads=4, encoder_layers=1, decoder_layers=1)
    config = SelfAttnConfig(**encoder_decoder, add_cross_attention=True, is_encoder_decoder=True)
    assert config.add_cross_attention and config.is_encoder_decoder


def test_from_pretrained_overrides_are_checked_and_derived_like_constructor_fields(tmp_path):
    """transformers sets from_pretrained's overrides on the config once built, past SelfAttnConfig's checks: an
    impossible value was accepted, saved, and refused only at the next load."""
    make_tiny_config("encoder").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"hidden_dropout_prob must be within \[0, 1\], got 5\.0"):
        SelfAttnConfig.from_pretrained(tmp_path, hidden_dropout_prob=5.0)
    with pytest.raises(ValueError, match=r"hidden_size \(30\) must be divisible by num_attention_heads"):
        SelfAttnConfig.from_pretrained(tmp_path, hidden_size=30)
    with pytest.raises(ValueError, match="is_encoder_decoder=True"):
        SelfAttnConfig.from_pretrained(tmp_path, is_encoder_decoder=True)
    # Good overrides apply, derived fields follow them, and what names no field is still handed back unused.
    config, unused = SelfAttnConfig.from_pretrained(
        tmp_path, hidden_size=48, decoder_layers=2, not_a_field=1, return_unused_kwargs=True
    )
    assert (config.hidden_size, config.head_dim, config.is_encoder_decoder) == (48, 12, True)
    assert unused == {"not_a_field": 1}
    config.save_pretrained(tmp_path)
    assert not SelfAttnConfig.from_pretrained(tmp_path, decoder_layers=0).is_encoder_decoder
    assert SelfAttnConfig.from_pretrained(tmp_path, num_hidden_layers=3).encoder_layers == 3


def test_source_config_is_checked_when_edited_by_hand():
    """@strict refuses a record that is not a dict, on creation and on assignment; a value config.json cannot hold,
    put in afterwards, is refused when a model is built."""
    with pytest.raises(StrictDataclassFieldValidationError, match="source_config"):
        SelfAttnConfig(source_model_type="distilbert", source_config=[("qa_dropout", 0.25)])
    config = make_tiny_config("encoder", source_model_type="distilbert", source_config={"qa_dropout": 0.25})
    with pytest.raises(StrictDataclassFieldValidationError, match="source_config"):
        config.source_config = [("qa_dropout", 0.25)]
    config.source_config["qa_dropout"] = float
    with pytest.raises(ValueError, match=r"source_config\['qa_dropout'\] = <class 'float'> is not a JSON value"):
        SelfAttnModel(config)


def test_hand_edited_config_is_checked_again_when_a_model_is_built():
    config = SelfAttnConfig(vocab_size=99, hidden_size=32, num_attention_heads=4, encoder_layers=1)
    config.num_attention_heads = 5
    with pytest.raises(ValueError, match="num_attention_heads"):
        SelfAttnModel(config)


def test_is_decoder_on_an_encoder_only_config_is_refused_pointing_to_the_decoder_only_shape():
    # BertModel turns causal with is_decoder=True; selfattn's encoder stack would have silently stayed bidirectional.
    with pytest.raises(ValueError, match=r"is_decoder=True\) with decoder_layers=0.*encoder_layers=0 and decoder_lay"):
        SelfAttnConfig(vocab_size=99, hidden_size=32, num_attention_heads=4, encoder_layers=1, is_decoder=True)
    config = SelfAttnConfig(vocab_size=99, hidden_size=32, num_attention_heads=4, encoder_layers=1)
    config.is_decoder = True  # as EncoderDecoderModel sets it on its decoder's config
    with pytest.raises(ValueError, match="is_decoder"):
        SelfAttnModel(config)
    # Where it holds (the decoder-only shape), or False, it is accepted.
    SelfAttnConfig(
        vocab_size=99, hidden_size=32, num_attention_heads=4, encoder_layers=0, decoder_layers=1, is_decoder=True
    )
    SelfAttnConfig(vocab_size=99, hidden_size=32, num_attention_heads=4, encoder_layers=1, is_decoder=False)


def test_saved_auto_map_names_only_files_the_folder_has(tmp_path):
    # A config saved by an older release names its classes in files that no longer exist (modeling_selfattn.py);
    # re-saving must point every entry at the files written now, and keep entries of other Auto classes.
    old_auto_map = {
        "AutoConfig": "configuration_selfattn.SelfAttnConfig",
        "AutoModel": "modeling_selfattn.SelfAttnModel",
        "AutoModelForMaskedLM": "modeling_selfattn.SelfAttnForMaskedLM",
        "AutoTokenizer": ["tokenization_mine.MyTokenizer", None],
    }
    config = make_tiny_config("encoder", auto_map=old_auto_map)
    SelfAttnForMaskedLM(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert saved["AutoTokenizer"] == ["tokenization_mine.MyTokenizer", None]
    for auto_class, target in saved.items():
        if auto_class != "AutoTokenizer":
            module, class_name = target.split(".")
            assert f"class {class_name}(" in (tmp_path / f"{module}.py").read_text(), (auto_class, target)
