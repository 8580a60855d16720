"""Tiny configs shared by the test files: hidden 32, 4 heads, 2 layers, vocab 99, positions for 16 tokens.

Dropout is off so that outputs are deterministic in train mode too (gradient checks, loss comparisons);
tests about dropout turn it back on explicitly.
"""

from pathlib import Path

import pytest
import transformers

from modeling_selfattn import SelfAttnConfig, packing

# Words of the tokenizer-backed tests (conversion, ONNX export), after BERT's five special tokens.
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "far", "away", "quick", "brown", "fox"]
WORD_PIECE_VOCAB_SIZE = len(WORDS) + 5


def save_word_piece_tokenizer(folder: Path) -> None:
    """A BERT WordPiece tokenizer of [PAD] [UNK] [CLS] [SEP] [MASK] and WORDS, saved in `folder`."""
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizer(str(vocab)).save_pretrained(folder)


TINY_VOCAB_SIZE = 99
TINY_MAX_POSITIONS = 16
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
DECODER_START_TOKEN_ID = 2

# encoder_layers / decoder_layers for each of the three model shapes one config can describe.
MODEL_SHAPES = {
    "encoder": {"encoder_layers": 2, "decoder_layers": 0},
    "encoder_decoder": {"encoder_layers": 2, "decoder_layers": 2},
    "decoder": {"encoder_layers": 0, "decoder_layers": 2},
}


def make_tiny_config(shape: str = "encoder", **overrides) -> SelfAttnConfig:
    """A tiny config of the given shape ("encoder", "encoder_decoder" or "decoder"); `overrides` replace
    any field."""
    fields = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_dropout=0.0,
        max_position_embeddings=TINY_MAX_POSITIONS,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        decoder_start_token_id=DECODER_START_TOKEN_ID,
        **MODEL_SHAPES[shape],
    )
    fields.update(overrides)
    return SelfAttnConfig(**fields)


@pytest.fixture
def tiny_encoder_config() -> SelfAttnConfig:
    """Encoder-only (BERT-style) tiny config."""
    return make_tiny_config("encoder")


@pytest.fixture
def tiny_encoder_decoder_config() -> SelfAttnConfig:
    """Encoder-decoder (the paper's shape) tiny config."""
    return make_tiny_config("encoder_decoder")


@pytest.fixture
def tiny_decoder_config() -> SelfAttnConfig:
    """Decoder-only (causal LM) tiny config."""
    return make_tiny_config("decoder")


@pytest.fixture
def tiny_config_factory():
    """`make_tiny_config(shape, **overrides)`, for tests that build configs per parameter."""
    return make_tiny_config


@pytest.fixture
def onednn_int8_exact() -> None:
    """Skips a test of oneDNN's int8 products where they cannot run exactly (quantization.ONEDNN_INT8_EXACT)."""
    from modeling_selfattn import quantization

    if not quantization.ONEDNN_INT8_EXACT:
        pytest.skip("oneDNN's int8 kernels are missing from this torch build or may saturate on this CPU (no VNNI)")


@pytest.fixture(params=["fbgemm", "onednn"])
def int8_kernel(request, monkeypatch) -> str:
    """Each int8 kernel in turn, whatever this CPU takes by default: fbgemm on every call, or oneDNN on every call
    (from one row; off AMX oneDNN is slow, which the small layers here can afford, and refused without VNNI)."""
    from modeling_selfattn.quantization import Int8DynamicLinear, Int8RowScaledLinear

    if request.param == "onednn":
        request.getfixturevalue("onednn_int8_exact")
    rows = 1 if request.param == "onednn" else None
    monkeypatch.setattr(Int8DynamicLinear, "onednn_min_rows", rows)
    monkeypatch.setattr(Int8RowScaledLinear, "onednn_min_rows", rows)
    return request.param


@pytest.fixture
def count_packings(monkeypatch):
    """A list that grows by one entry each time a batch is packed."""
    packings = []
    original = packing.PackedSequences.from_attention_mask.__func__

    def counting(cls, attention_mask, *args):
        packings.append(tuple(attention_mask.shape))
        return original(cls, attention_mask, *args)

    monkeypatch.setattr(packing.PackedSequences, "from_attention_mask", classmethod(counting))
    return packings
