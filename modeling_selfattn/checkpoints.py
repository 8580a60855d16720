"""Convert BERT-family checkpoints of transformers (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA, and
BERT-layout models such as MiniLM) to selfattn, and back; and encoder-decoder checkpoints (Marian, BART) to
selfattn.

A family is data, not code: a `Family` lists how tensor names map (`Rename` templates where `{layer}` is a
layer index and `*` one name part such as `weight` or `bias`, plus `Drop` entries that say why a tensor has no
place in selfattn), how config fields map (renamed fields, fields this layout always has, source fields
required to hold a value), and which selfattn head each of its architectures becomes. One engine applies a
family in both directions and returns a `ConversionReport` (tensors mapped, dropped with the reason, unused
source tensors, missing target tensors, shape mismatches); a tensor is never dropped without a reason, and
`ConversionReport.check()` raises on anything unexplained. To add a family, write its tables and add it to
`FAMILIES`.

Package-only: saved models do not ship it. Importing the package plugs `foreign_checkpoint_kwargs` and
`selfattn_config_dict` into the model classes, so that their from_pretrained reads BERT-family folders directly.
"""

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file

from . import model as selfattn_model
from .config import SelfAttnConfig

logger = logging.getLogger(__name__)


class ConversionError(ValueError):
    """A checkpoint or config that cannot be mapped; the message lists every problem found."""


# ----------------------------------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class Rename:
    """Tensor name template in the source layout -> the selfattn name (`model.` prefix as in the head classes)."""

    source: str
    target: str


@dataclass(frozen=True)
class Alias(Rename):
    """A second source name for a target another `Rename` fills, which transformers' model reads only where the two
    hold the same values (it ties them, or keeps them equal), and not at all where they differ. Where both are in a
    checkpoint and differ, the alias is dropped, and `why` says why that loses nothing; alone, it fills the target
    (older checkpoints hold only it)."""

    why: str = ""


@dataclass(frozen=True)
class Drop:
    """Source tensors with no selfattn counterpart, and why that loses nothing."""

    source: str
    reason: str


@dataclass(frozen=True)
class SourceField:
    """A selfattn config value copied from this field of the source config, and back on export (through `back`, from
    the selfattn config dict, where the field takes another value than the selfattn field holds)."""

    name: str
    back: Callable[[dict], object] | None = None


@dataclass(frozen=True)
class Head:
    """What one source architecture becomes: the selfattn class, the config fields that class needs (values or
    `SourceField`s; a field set here is the head's, whatever the family's renames say), source config fields the
    architecture requires to hold a value, and `optional_requirements`: fields the family's config does not declare
    but transformers' model reads where present, which must then hold the value their absence means (kept in
    `source_config`; export writes the required value where the record has the field, and leaves it out otherwise)."""

    target: str
    config: dict = field(default_factory=dict)
    requirements: dict = field(default_factory=dict)
    optional_requirements: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # config.json "model_type"
    class_prefix: str  # transformers' classes are class_prefix + suffix, e.g. "Bert" + "ForMaskedLM"
    base_prefix: str  # where head models keep the backbone ("bert." in "bert.encoder...")
    backbone: tuple  # Rename/Drop, names relative to the backbone
    head_tensors: tuple  # Rename/Drop, names at the top of a head model
    heads: dict  # class-name suffix ("Model", "ForMaskedLM", ...) -> Head
    config_renames: tuple  # (source field, selfattn field)
    config_fixed: dict  # selfattn fields this layout always has (checked when exporting)
    config_requirements: dict  # source fields that must hold a value when present (e.g. is_decoder False)
    # The tokenizer class of the family's checkpoints, which a converted config.json names where the source names
    # none: AutoTokenizer goes by model_type otherwise, and the selfattn config's model_type is selfattn. Stated here
    # rather than asked of transformers, which maps a model_type to no class when an optional package the tokenizer
    # needs (Marian's sentencepiece) is missing.
    tokenizer_class: str
    config_to_selfattn: Callable[[dict], dict] | None = None  # fields derived from several source fields
    # The source fields config_to_selfattn reads, and the only ones it is given: the report counts them as carried.
    config_derived_from: tuple = ()
    config_from_selfattn: Callable[[dict], dict] | None = None  # and back
    # transformers applies this activation in the MLM head whatever hidden_act is; selfattn uses hidden_act.
    lm_head_activation: str | None = None
    # Pairs of source fields that one selfattn field describes (e.g. encoder and decoder heads): they must agree.
    config_same: tuple = ()
    # selfattn fields import sets but export does not check: every value has an equivalent in the family (an
    # encoder-decoder builds no pooler whatever add_pooling_layer says; no logits bias is a bias of zeros).
    config_import_only: dict = field(default_factory=dict)
    # Tensors the family's checkpoints hold that selfattn computes rather than stores, made on export from the
    # selfattn config dict: {name in the head model's layout: (tensor, why)}. Used only where no stored tensor fills
    # the name.
    export_tensors: Callable[[dict], dict] | None = None

    def architecture(self, suffix: str) -> str:
        return self.class_prefix + suffix


def same(*names: str) -> tuple:
    return tuple((name, name) for name in names)


def modules(prefix_source: str, prefix_target: str, pairs: Iterable[tuple[str, str]]) -> tuple:
    """Rename every tensor (`*`) of each module pair under the two prefixes."""
    return tuple(Rename(f"{prefix_source}{source}.*", f"{prefix_target}{target}.*") for source, target in pairs)


LAYER = "model.encoder.layers.{layer}."
EMBEDDINGS = "model.encoder.embeddings."
POSITION_BUFFERS = (
    Drop("embeddings.position_ids", "a buffer holding 0, 1, 2, ...; selfattn computes positions"),
    Drop("embeddings.token_type_ids", "a buffer of zeros, the default token types; selfattn makes them"),
)

BERT_EMBEDDINGS = modules(
    "embeddings.",
    EMBEDDINGS,
    same("word_embeddings", "position_embeddings", "token_type_embeddings") + (("LayerNorm", "layer_norm"),),
)
BERT_LAYERS = modules(
    "encoder.layer.{layer}.",
    LAYER,
    (
        ("attention.self.query", "self_attn.q_proj"),
        ("attention.self.key", "self_attn.k_proj"),
        ("attention.self.value", "self_attn.v_proj"),
        ("attention.output.dense", "self_attn.o_proj"),
        ("attention.output.LayerNorm", "self_attn_layer_norm"),
        ("intermediate.dense", "ffn.fc1"),
        ("output.dense", "ffn.fc2"),
        ("output.LayerNorm", "ffn_layer_norm"),
    ),
)
POOLER = (Rename("pooler.dense.*", "model.pooler.dense.*"),)


def lm_head(transform: str, layer_norm: str, decoder: str, head_bias: str | None = None) -> tuple:
    """An MLM head: transform dense + LayerNorm + decoder. `head_bias` names the head's own bias parameter where it
    has one beside the decoder's (BERT's, RoBERTa's): an `Alias` of the decoder bias, listed first because export
    writes a tensor under the first name transformers' model has, and checkpoints saved tied hold it."""
    bias_alias = () if head_bias is None else (
        Alias(
            head_bias,
            "lm_head.decoder.bias",
            f"the MLM head's own bias parameter, which transformers' forward does not add: it adds {decoder}.bias, "
            "tied to this one only where the config ties them (tie_word_embeddings=True) and both are equal",
        ),
    )
    return (
        Rename(f"{transform}.*", "lm_head.dense.*"),
        Rename(f"{layer_norm}.*", "lm_head.layer_norm.*"),
        Rename(f"{decoder}.weight", "lm_head.decoder.weight"),
    ) + bias_alias + (Rename(f"{decoder}.bias", "lm_head.decoder.bias"),)


def classifier_head(dense: str, out_proj: str) -> tuple:
    """dense + activation + out_proj on the first token: selfattn's pooler + classifier."""
    return (Rename(f"{dense}.*", "model.pooler.dense.*"), Rename(f"{out_proj}.*", "classifier.*"))


TASK_TENSORS = (Rename("classifier.*", "classifier.*"), Rename("qa_outputs.*", "qa_outputs.*"))

POOLED = {"add_pooling_layer": True, "pooler_activation": "tanh"}
RELU_POOLED = {"add_pooling_layer": True, "pooler_activation": "relu"}
GELU_POOLED = {"add_pooling_layer": True, "pooler_activation": "gelu"}
NOT_POOLED = {"add_pooling_layer": False}

def encoder_heads(base: dict, classification: dict, multiple_choice: Head | None = None, **extra: Head) -> dict:
    """The heads every encoder family has: the bare model with the `base` pooler settings, sequence
    classification and multiple choice with the `classification` ones (unless `multiple_choice` is given), and
    `extra` heads by class-name suffix."""
    return {
        "Model": Head("SelfAttnModel", base),
        "ForMaskedLM": Head("SelfAttnForMaskedLM"),
        "ForSequenceClassification": Head("SelfAttnForSequenceClassification", classification),
        "ForTokenClassification": Head("SelfAttnForTokenClassification"),
        "ForQuestionAnswering": Head("SelfAttnForQuestionAnswering"),
        "ForMultipleChoice": multiple_choice or Head("SelfAttnForMultipleChoice", classification),
        **extra,
    }


ENCODER_ONLY = {
    "decoder_layers": 0,
    "position_embedding_type": "learned",
    "position_offset": 0,
    "padding_aware_positions": False,
    "embedding_size": None,
    "embedding_layer_norm": True,
    "scale_embedding": False,
    "pre_layer_norm": False,
    "add_final_logits_bias": False,
    "activation_dropout": 0.0,
}
BERT_CONFIG_RENAMES = same(
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "initializer_range",
    "classifier_dropout",
) + (("num_hidden_layers", "encoder_layers"), ("attention_probs_dropout_prob", "attention_dropout"))
ENCODER_REQUIREMENTS = {"is_decoder": False, "add_cross_attention": False, "position_embedding_type": "absolute"}
# Fields with the same meaning in every family (PreTrainedConfig's, which selfattn reads as transformers' models do,
# and tokenizer_class, which AutoTokenizer reads).
SHARED_CONFIG_FIELDS = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "id2label",
    "label2id",
    "problem_type",
    "dtype",
    "chunk_size_feed_forward",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "tokenizer_class",
)
# PreTrainedConfig fields the selfattn config sets itself: the file's own record, the head (from the architecture)
# and is_encoder_decoder (from encoder_layers and decoder_layers).
SELFATTN_SET_CONFIG_FIELDS = (
    "transformers_version",
    "_name_or_path",
    "model_type",
    "architectures",
    "is_encoder_decoder",
)

BERT = Family(
    name="bert",
    model_type="bert",
    class_prefix="Bert",
    base_prefix="bert",
    backbone=BERT_EMBEDDINGS + BERT_LAYERS + POOLER + POSITION_BUFFERS,
    head_tensors=lm_head(
        "cls.predictions.transform.dense",
        "cls.predictions.transform.LayerNorm",
        "cls.predictions.decoder",
        "cls.predictions.bias",
    )
    + (Rename("cls.seq_relationship.*", "next_sentence.*"),)
    + TASK_TENSORS,
    heads=encoder_heads(POOLED, POOLED, ForPreTraining=Head("SelfAttnForPreTraining", POOLED)),
    config_renames=BERT_CONFIG_RENAMES,
    config_fixed=ENCODER_ONLY,
    config_requirements=ENCODER_REQUIREMENTS,
    tokenizer_class="BertTokenizer",
)


def roberta_positions(source: dict) -> dict:
    # RoBERTa numbers positions from pad_token_id + 1 and gives padding row pad_token_id; its table counts those
    # reserved rows in max_position_embeddings, selfattn's does not.
    if source.get("pad_token_id") is None:
        raise ConversionError("RoBERTa positions start after the padding row, so config.pad_token_id must be set.")
    offset = source["pad_token_id"] + 1
    return {"position_offset": offset, "max_position_embeddings": source["max_position_embeddings"] - offset}


def roberta_positions_back(config: dict) -> dict:
    if config["position_offset"] != config["pad_token_id"] + 1:
        raise ConversionError(
            f"RoBERTa reserves pad_token_id + 1 = {config['pad_token_id'] + 1} position rows, but this config has "
            f"position_offset={config['position_offset']}; it has no RoBERTa equivalent."
        )
    return {"max_position_embeddings": config["max_position_embeddings"] + config["position_offset"]}


ROBERTA = replace(
    BERT,
    name="roberta",
    model_type="roberta",
    class_prefix="Roberta",
    base_prefix="roberta",
    head_tensors=lm_head("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", "lm_head.bias")
    + classifier_head("classifier.dense", "classifier.out_proj")
    + TASK_TENSORS,
    # The classification head's dense + tanh is a pooler.
    heads=encoder_heads(POOLED, POOLED),
    # position_offset and max_position_embeddings come from roberta_positions.
    config_fixed={**{k: v for k, v in ENCODER_ONLY.items() if k != "position_offset"}, "padding_aware_positions": True},
    tokenizer_class="RobertaTokenizer",
    config_to_selfattn=roberta_positions,
    config_derived_from=("pad_token_id", "max_position_embeddings"),
    config_from_selfattn=roberta_positions_back,
    lm_head_activation="gelu",
)

XLM_ROBERTA = replace(
    ROBERTA,
    name="xlm-roberta",
    model_type="xlm-roberta",
    class_prefix="XLMRoberta",
    tokenizer_class="XLMRobertaTokenizer",
)


def classifier_dropout_rate(config: dict) -> float:
    """The dropout before selfattn's classifiers as a number, for source fields that take a number only:
    classifier_dropout, or hidden_dropout_prob where it is None (which the model reads as hidden_dropout_prob)."""
    dropout = config["classifier_dropout"]
    return config["hidden_dropout_prob"] if dropout is None else dropout


def distilbert_classifier_dropout_back(config: dict) -> dict:
    return {"seq_classif_dropout": classifier_dropout_rate(config)}


DISTILBERT = Family(
    name="distilbert",
    model_type="distilbert",
    class_prefix="DistilBert",
    base_prefix="distilbert",
    backbone=modules(
        "embeddings.", EMBEDDINGS, same("word_embeddings", "position_embeddings") + (("LayerNorm", "layer_norm"),)
    )
    + modules(
        "transformer.layer.{layer}.",
        LAYER,
        (
            ("attention.q_lin", "self_attn.q_proj"),
            ("attention.k_lin", "self_attn.k_proj"),
            ("attention.v_lin", "self_attn.v_proj"),
            ("attention.out_lin", "self_attn.o_proj"),
            ("sa_layer_norm", "self_attn_layer_norm"),
            ("ffn.lin1", "ffn.fc1"),
            ("ffn.lin2", "ffn.fc2"),
            ("output_layer_norm", "ffn_layer_norm"),
        ),
    )
    + POSITION_BUFFERS,
    head_tensors=lm_head("vocab_transform", "vocab_layer_norm", "vocab_projector")
    + (Rename("pre_classifier.*", "model.pooler.dense.*"),)
    + TASK_TENSORS,
    # No pooler in the bare model; pre_classifier + ReLU is a pooler with a ReLU.
    heads=encoder_heads(NOT_POOLED, RELU_POOLED),
    config_renames=same("vocab_size", "max_position_embeddings", "initializer_range", "attention_dropout")
    + (
        ("dim", "hidden_size"),
        ("n_heads", "num_attention_heads"),
        ("n_layers", "encoder_layers"),
        ("hidden_dim", "intermediate_size"),
        ("activation", "hidden_act"),
        ("dropout", "hidden_dropout_prob"),
        ("seq_classif_dropout", "classifier_dropout"),
    ),
    # DistilBERT has no token types and fixes every LayerNorm epsilon.
    config_fixed={**ENCODER_ONLY, "type_vocab_size": 0, "layer_norm_eps": 1e-12},
    config_requirements={},
    tokenizer_class="BertTokenizer",  # DistilBERT checkpoints use BERT's WordPiece vocabularies
    config_from_selfattn=distilbert_classifier_dropout_back,
)


def electra_embedding_size(source: dict) -> dict:
    size = source["embedding_size"]
    return {"embedding_size": None if size == source["hidden_size"] else size}


def electra_embedding_size_back(config: dict) -> dict:
    return {"embedding_size": config["embedding_size"] or config["hidden_size"]}


ELECTRA = replace(
    BERT,
    name="electra",
    model_type="electra",
    class_prefix="Electra",
    base_prefix="electra",
    backbone=BERT_EMBEDDINGS
    + BERT_LAYERS
    + (Rename("embeddings_project.*", EMBEDDINGS + "projection.*"),)
    + POSITION_BUFFERS,
    head_tensors=lm_head("generator_predictions.dense", "generator_predictions.LayerNorm", "generator_lm_head")
    + (
        Rename("discriminator_predictions.dense.*", "discriminator.dense.*"),
        Rename("discriminator_predictions.dense_prediction.*", "discriminator.out_proj.*"),
        Rename("sequence_summary.summary.*", "model.pooler.dense.*"),
    )
    + classifier_head("classifier.dense", "classifier.out_proj")
    + TASK_TENSORS,
    # No pooler in the bare model; the classification head's dense uses gelu where BERT's pooler uses tanh, and
    # the multiple-choice head's sequence summary (first token, dense, activation, dropout summary_last_dropout) is a
    # pooler too, followed by the classifier's dropout. ELECTRA's summary takes no dropout before its dense where
    # summary_first_dropout (not an ElectraConfig field, read where present) is absent or 0; selfattn's pooler has
    # none.
    heads=encoder_heads(
        NOT_POOLED,
        GELU_POOLED,
        Head(
            "SelfAttnForMultipleChoice",
            {
                "add_pooling_layer": True,
                "pooler_activation": SourceField("summary_activation"),
                "classifier_dropout": SourceField("summary_last_dropout", back=classifier_dropout_rate),
            },
            {"summary_type": "first", "summary_use_proj": True},
            {"summary_first_dropout": 0},
        ),
        ForPreTraining=Head("SelfAttnForReplacedTokenDetection"),
    ),
    config_fixed={key: value for key, value in ENCODER_ONLY.items() if key != "embedding_size"},
    tokenizer_class="BertTokenizer",
    config_to_selfattn=electra_embedding_size,
    config_derived_from=("embedding_size", "hidden_size"),
    config_from_selfattn=electra_embedding_size_back,
    lm_head_activation="gelu",
)


def seq2seq_layers(stack: str) -> tuple:
    """The layers of a BART-layout stack (Marian, BART): fairseq's names, cross-attention in the decoder."""
    attention = (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("out_proj", "o_proj"))
    pairs = [(f"self_attn.{source}", f"self_attn.{target}") for source, target in attention]
    if stack == "decoder":
        pairs += [(f"encoder_attn.{source}", f"cross_attn.{target}") for source, target in attention]
        pairs.append(("encoder_attn_layer_norm", "cross_attn_layer_norm"))
    pairs += [
        ("self_attn_layer_norm", "self_attn_layer_norm"),
        ("fc1", "ffn.fc1"),
        ("fc2", "ffn.fc2"),
        ("final_layer_norm", "ffn_layer_norm"),  # the layer's last LayerNorm, after the FFN
    ]
    return modules(stack + ".layers.{layer}.", f"model.{stack}.layers.{{layer}}.", pairs)


SEQ2SEQ_TOKENS = (
    # One token table for both stacks (and, tied, the LM head): selfattn keeps it in the encoder's embeddings, which
    # the decoder's are (one tensor: the engine compares the two stacks' tables, see `one_source_per_target`).
    # transformers' stacks read their own embed_tokens; `shared` is only what they are tied to.
    Alias(
        "shared.weight",
        EMBEDDINGS + "word_embeddings.weight",
        "the shared token table, which transformers' encoder and decoder do not read: they read their own "
        "embed_tokens, tied to it only where the config ties them (tie_word_embeddings=True) and all are equal",
    ),
    Rename("encoder.embed_tokens.weight", EMBEDDINGS + "word_embeddings.weight"),
    Rename("decoder.embed_tokens.weight", "model.decoder.embeddings.word_embeddings.weight"),
)
SEQ2SEQ_HEAD_TENSORS = (
    Rename("lm_head.weight", "lm_head.weight"),
    Rename("final_logits_bias", "final_logits_bias"),
)
SEQ2SEQ_CONFIG_RENAMES = same(
    "vocab_size",
    "encoder_layers",
    "decoder_layers",
    "max_position_embeddings",
    "attention_dropout",
    "activation_dropout",
    "scale_embedding",
    "decoder_start_token_id",
) + (
    ("d_model", "hidden_size"),
    ("encoder_attention_heads", "num_attention_heads"),
    ("encoder_ffn_dim", "intermediate_size"),
    ("activation_function", "hidden_act"),
    ("dropout", "hidden_dropout_prob"),
    ("init_std", "initializer_range"),
)
SEQ2SEQ_CONFIG_SAME = (
    ("decoder_attention_heads", "encoder_attention_heads"),
    ("decoder_ffn_dim", "encoder_ffn_dim"),
)
ENCODER_DECODER = {
    "padding_aware_positions": False,
    "type_vocab_size": 0,
    "embedding_size": None,
    "pre_layer_norm": False,
    "layer_norm_eps": 1e-5,  # nn.LayerNorm's default, which both families use
    "lm_head_transform": False,  # the LM head projects onto the token table directly
}
SEQ2SEQ_IMPORT_ONLY = {"add_pooling_layer": False, "add_final_logits_bias": True}
SEQ2SEQ_HEADS = {"Model": Head("SelfAttnModel")}


def zero_logits_bias(config: dict) -> dict:
    return {
        "final_logits_bias": (
            torch.zeros(1, config["vocab_size"]),
            "zeros: this model adds no bias to its logits (add_final_logits_bias=False)",
        )
    }


def marian_computed_tensors(config: dict) -> dict:
    # selfattn's own table (the one its model adds), so that the exported model computes what selfattn computes.
    table = selfattn_model.sinusoidal_positions(config["max_position_embeddings"], config["hidden_size"])
    why = "the fixed sinusoidal table, as selfattn computes it"
    positions = {f"model.{stack}.embed_positions.weight": (table.clone(), why) for stack in ("encoder", "decoder")}
    return {**positions, **zero_logits_bias(config)}

MARIAN = Family(
    name="marian",
    model_type="marian",
    class_prefix="Marian",
    base_prefix="model",
    backbone=SEQ2SEQ_TOKENS
    + seq2seq_layers("encoder")
    + seq2seq_layers("decoder")
    + tuple(
        Drop(f"{stack}.embed_positions.weight", "the fixed sinusoidal table, which selfattn computes identically")
        for stack in ("encoder", "decoder")
    ),
    head_tensors=SEQ2SEQ_HEAD_TENSORS,
    heads={**SEQ2SEQ_HEADS, "MTModel": Head("SelfAttnForConditionalGeneration")},
    config_renames=SEQ2SEQ_CONFIG_RENAMES,
    # Sinusoidal positions from 0 (sines then cosines), no embedding LayerNorm, post-LN layers.
    config_fixed={
        **ENCODER_DECODER,
        "position_embedding_type": "sinusoidal",
        "position_offset": 0,
        "embedding_layer_norm": False,
    },
    # A separate decoder vocabulary would need a second token table.
    config_requirements={"share_encoder_decoder_embeddings": True, "is_decoder": False},
    tokenizer_class="MarianTokenizer",
    config_same=SEQ2SEQ_CONFIG_SAME + (("decoder_vocab_size", "vocab_size"),),
    config_import_only=SEQ2SEQ_IMPORT_ONLY,
    export_tensors=marian_computed_tensors,
)

BART = Family(
    name="bart",
    model_type="bart",
    class_prefix="Bart",
    base_prefix="model",
    backbone=SEQ2SEQ_TOKENS
    + seq2seq_layers("encoder")
    + seq2seq_layers("decoder")
    + tuple(
        rule
        for stack in ("encoder", "decoder")
        for rule in (
            Rename(f"{stack}.embed_positions.weight", f"model.{stack}.embeddings.position_embeddings.weight"),
            Rename(f"{stack}.layernorm_embedding.*", f"model.{stack}.embeddings.layer_norm.*"),
        )
    ),
    head_tensors=SEQ2SEQ_HEAD_TENSORS,
    heads={**SEQ2SEQ_HEADS, "ForConditionalGeneration": Head("SelfAttnForConditionalGeneration")},
    config_renames=SEQ2SEQ_CONFIG_RENAMES,
    # Learned positions with two reserved rows (fairseq's), a LayerNorm over the embeddings, post-LN layers.
    config_fixed={
        **ENCODER_DECODER,
        "position_embedding_type": "learned",
        "position_offset": 2,
        "embedding_layer_norm": True,
    },
    config_requirements={"is_decoder": False},
    tokenizer_class="RobertaTokenizer",  # transformers 5 reads BART's byte-level BPE files with RoBERTa's class
    config_same=SEQ2SEQ_CONFIG_SAME,
    config_import_only=SEQ2SEQ_IMPORT_ONLY,
    export_tensors=zero_logits_bias,
)

FAMILIES = {
    family.model_type: family for family in (BERT, ROBERTA, XLM_ROBERTA, DISTILBERT, ELECTRA, MARIAN, BART)
}
# The encoder-only families (BERT layout) and the encoder-decoder ones; export writes every one of them.
ENCODER_FAMILIES = {name: family for name, family in FAMILIES.items() if family.config_fixed.get("decoder_layers") == 0}
SEQ2SEQ_FAMILIES = {name: family for name, family in FAMILIES.items() if name not in ENCODER_FAMILIES}
EXPORT_FAMILIES = FAMILIES


# ----------------------------------------------------------------------------------------------------------------
# Looking things up


def family_for(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise ConversionError(
            f"Cannot convert model_type={model_type!r}: supported are {sorted(FAMILIES)} (and BERT-layout models "
            "such as MiniLM, whose model_type is bert)."
        )
    return FAMILIES[model_type]


def supported_architectures(family: Family) -> list[str]:
    return [family.architecture(suffix) for suffix in family.heads]


def head_for(family: Family, architecture: str) -> Head:
    suffix = architecture.removeprefix(family.class_prefix)
    if not architecture.startswith(family.class_prefix) or suffix not in family.heads:
        raise ConversionError(
            f"Unknown {family.name} architecture {architecture!r}; supported are {supported_architectures(family)}."
        )
    return family.heads[suffix]


def architecture_for(family: Family, target_class: str) -> str:
    """The source architecture whose selfattn head is `target_class` (for export and loading on the fly)."""
    for suffix, head in family.heads.items():
        if head.target == target_class:
            return family.architecture(suffix)
    supported = sorted({head.target for head in family.heads.values()})
    raise ConversionError(f"{target_class} has no {family.name} counterpart; {family.name} has {supported}.")


def target_class(name: str) -> type:
    return getattr(selfattn_model, name)


# ----------------------------------------------------------------------------------------------------------------
# Config


def full_source_config(config_dict: dict) -> dict:
    """The source config with the family's defaults filled in, as transformers would read it."""
    from transformers import AutoConfig

    fields = {key: value for key, value in config_dict.items() if key != "model_type"}
    return AutoConfig.for_model(config_dict["model_type"], **fields).to_dict()


def check_requirements(source: dict, requirements: dict, what: str) -> None:
    wrong = [
        f"{name}={source[name]!r} (selfattn needs {value!r})"
        for name, value in requirements.items()
        if name in source and source[name] != value
    ]
    if wrong:
        raise ConversionError(f"{what} cannot be converted: " + "; ".join(wrong) + ".")


def config_renames(family: Family, head: Head) -> tuple:
    """The family's (source field, selfattn field) renames that `head` leaves to the family: a selfattn field the
    head sets (ELECTRA's multiple-choice classifier_dropout, from summary_last_dropout) is the head's, and the
    family's field of that name is then one selfattn does not use."""
    return tuple((source, target) for source, target in family.config_renames if target not in head.config)


# Source config.json fields that name files of the source folder, which the conversion does not copy: its code
# (auto_map; OUTPUT runs selfattn's) and its weights file (transformers_weights; OUTPUT writes model.safetensors).
# Kept in source_config, they would send the exported folder's loader to files it lacks; the report lists them.
SOURCE_FOLDER_FIELDS = ("auto_map", "transformers_weights")


def selfattn_config_kwargs(config_dict: dict, architecture: str) -> tuple[dict, list[str]]:
    """SelfAttnConfig fields for a source config and the head of `architecture`, and the source fields not carried
    over. The source fields no selfattn field holds (they only matter to code paths selfattn does not have) go to
    `source_config`, for export back to the family, except `SOURCE_FOLDER_FIELDS`: those are the ones not carried."""
    family = family_for(config_dict.get("model_type"))
    source = full_source_config(config_dict)
    head = head_for(family, architecture)
    check_requirements(
        source,
        {**family.config_requirements, **head.requirements, **head.optional_requirements},
        f"This {family.name} config",
    )
    disagreements = [
        f"{first}={source.get(first)!r} but {second}={source.get(second)!r}"
        for first, second in family.config_same
        if source.get(first) != source.get(second)
    ]
    if disagreements:
        raise ConversionError(
            f"This {family.name} config cannot be converted: " + "; ".join(disagreements) + ". selfattn gives both "
            "stacks one value for each of these."
        )

    kwargs = {name: source[name] for name in SHARED_CONFIG_FIELDS if name in source}
    renames = config_renames(family, head)
    kwargs.update({target_name: source[source_name] for source_name, target_name in renames})
    fixed = {**family.config_fixed, **family.config_import_only, **head.config}
    kwargs.update(
        {name: source[value.name] if isinstance(value, SourceField) else value for name, value in fixed.items()}
    )
    if family.config_to_selfattn is not None:
        kwargs.update(
            family.config_to_selfattn({name: source[name] for name in family.config_derived_from if name in source})
        )
    kwargs["source_model_type"] = family.model_type
    check_lm_head_activation(family, head, kwargs["hidden_act"])
    used = {name for name, _ in renames} | set(SHARED_CONFIG_FIELDS) | set(family.config_requirements)
    used |= set(head.requirements) | {value.name for value in fixed.values() if isinstance(value, SourceField)}
    used |= {name for pair in family.config_same for name in pair} | set(SELFATTN_SET_CONFIG_FIELDS)
    used |= set(family.config_derived_from)
    unmapped = unmapped_fields(source, used)
    # A field of head.optional_requirements lands here where present (holding the value its absence means).
    kwargs["source_config"] = {name: source[name] for name in unmapped if name not in SOURCE_FOLDER_FIELDS} or None
    return kwargs, [name for name in unmapped if name in SOURCE_FOLDER_FIELDS]


def check_lm_head_activation(family: Family, head: Head, hidden_act: str) -> None:
    if family.lm_head_activation and head.target in ("SelfAttnForMaskedLM", "SelfAttnForPreTraining"):
        if hidden_act != family.lm_head_activation:
            raise ConversionError(
                f"The {family.name} MLM head applies {family.lm_head_activation} whatever hidden_act is, but this "
                f"config has hidden_act={hidden_act!r}; selfattn's MLM head uses hidden_act, so the head cannot be "
                "converted exactly (the encoder alone can: convert it as the base model)."
            )


def unmapped_fields(source: dict, used: set) -> list[str]:
    """The fields of config dict `source` outside `used` whose value the other side would not hold: a field of every
    config unless it holds the default (which the other config has too), never a decoding setting (those travel in
    the generation config of a model that generates: `source_generation_config` reads them from config.json, and
    export copies generation_config.json), and every other field. Used both ways: on conversion, the fields
    `source_config` keeps for export; on export, the fields written with the family's defaults."""
    from transformers import GenerationConfig, PreTrainedConfig

    defaults, decoding = PreTrainedConfig().to_dict(), GenerationConfig().to_dict()
    return sorted(
        name
        for name, value in source.items()
        if name not in used and (value != defaults[name] if name in defaults else name not in decoding)
    )


def source_architecture(family: Family, config_dict: dict) -> str:
    """The architecture config.json names; the bare model where it names none."""
    return (config_dict.get("architectures") or [family.architecture("Model")])[0]


def selfattn_config_dict(config_dict: dict) -> dict:
    """A BERT-family config.json translated to a selfattn one (used by `SelfAttnConfig.from_pretrained`). The
    head-specific fields follow the architecture config.json names when selfattn has it; a model class loading
    the checkpoint sets its own."""
    family = family_for(config_dict.get("model_type"))
    architecture = source_architecture(family, config_dict)
    if architecture.removeprefix(family.class_prefix) not in family.heads:
        architecture = family.architecture("Model")
    kwargs, _ = selfattn_config_kwargs(config_dict, architecture)
    return {**kwargs, "model_type": SelfAttnConfig.model_type}


def recorded_source_config(config: SelfAttnConfig, family: Family) -> dict:
    """The fields `config.source_config` recorded for export to `family`: all of them where the model was converted
    from that family (`source_model_type`), none for another, whose config they do not describe."""
    return dict(config.source_config or {}) if config.source_model_type == family.model_type else {}


def source_config_dict(config: SelfAttnConfig, family: Family) -> dict:
    """The source family's config.json fields for a selfattn config (the inverse of `selfattn_config_kwargs`): the
    fields the selfattn config holds, and those `recorded_source_config` kept, which never override the former;
    raises if the selfattn config uses something the family cannot express."""
    values = config.to_dict()
    architecture = architecture_for(family, (config.architectures or ["SelfAttnModel"])[0])
    head = head_for(family, architecture)
    check_lm_head_activation(family, head, values["hidden_act"])
    recorded = recorded_source_config(config, family)
    source = {name: values[name] for name in SHARED_CONFIG_FIELDS if name in values}
    source.update({source_name: values[target_name] for source_name, target_name in config_renames(family, head)})
    impossible = []
    for name, value in {**family.config_fixed, **head.config}.items():
        if isinstance(value, SourceField):
            source[value.name] = values[name] if value.back is None else value.back(values)
        elif values[name] != value:
            impossible.append(f"{name}={values[name]!r} ({family.name} always has {value!r})")
    if impossible:
        raise ConversionError(f"This selfattn config has no {family.name} equivalent: " + "; ".join(impossible) + ".")
    if family.config_from_selfattn is not None:
        source.update(family.config_from_selfattn(values))
    source.update({**family.config_requirements, **head.requirements})
    source.update({name: value for name, value in head.optional_requirements.items() if name in recorded})
    # Both fields of a pair take the one value selfattn has for them (e.g. encoder and decoder heads).
    for first, second in family.config_same:
        if second in source:
            source.setdefault(first, source[second])
        elif first in source:
            source[second] = source[first]
    # position_embedding_type="absolute" is no longer a field of transformers' BERT configs, but stays in the file
    # as in the checkpoints transformers itself publishes: tools such as CTranslate2's converter still read it.
    return {**recorded, **source, "model_type": family.model_type, "architectures": [architecture]}


# ----------------------------------------------------------------------------------------------------------------
# Tensor names


def template_regex(template: str) -> str:
    parts = re.split(r"(\{layer\}|\*)", template)
    return "".join(
        "(?P<layer>\\d+)" if part == "{layer}" else "(?P<leaf>[A-Za-z_]+)" if part == "*" else re.escape(part)
        for part in parts
    )


def fill(template: str, match: re.Match) -> str:
    groups = match.groupdict()
    return template.replace("{layer}", groups.get("layer") or "").replace("*", groups.get("leaf") or "")


def compile_rules(family: Family) -> list[tuple[re.Pattern, Rename | Drop]]:
    """Backbone names may carry the base prefix (head checkpoints) or not (base checkpoints)."""
    backbone_prefix = f"(?:{re.escape(family.base_prefix)}\\.)?"
    return [
        (re.compile(prefix + template_regex(rule.source)), rule)
        for rules, prefix in ((family.backbone, backbone_prefix), (family.head_tensors, ""))
        for rule in rules
    ]


# Checkpoints written before LayerNorm parameters were called weight and bias (TensorFlow ports).
LEGACY_LAYER_NORM_NAMES = {"gamma": "weight", "beta": "bias"}


def normalised_name(name: str) -> str:
    module, _, leaf = name.rpartition(".")
    if leaf in LEGACY_LAYER_NORM_NAMES and ("LayerNorm" in module or "layer_norm" in module):
        return f"{module}.{LEGACY_LAYER_NORM_NAMES[leaf]}"
    return name


def head_prefix_for(class_name: str) -> str:
    """Where a selfattn class keeps its SelfAttnModel: under `model.`, except the bare model itself."""
    return "" if class_name == "SelfAttnModel" else "model."


def rename(family: Family, names: Iterable[str], head_prefix: str) -> tuple[dict, dict, list, dict]:
    """Source names -> ({source: selfattn name}, {source: why dropped}, [names no rule matches], {source mapped by an
    `Alias`: why transformers does not read it where it differs from the name it aliases}).
    `head_prefix` is "model." for head classes and "" for the bare SelfAttnModel."""
    rules = compile_rules(family)
    mapped, dropped, unmatched, aliases = {}, {}, [], {}
    for name in names:
        key = normalised_name(name)
        for pattern, rule in rules:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if isinstance(rule, Drop):
                dropped[name] = rule.reason
            else:
                target = fill(rule.target, match)
                mapped[name] = target if head_prefix else target.removeprefix("model.")
                if isinstance(rule, Alias):
                    aliases[name] = rule.why
            break
        else:
            unmatched.append(name)
    return mapped, dropped, unmatched, aliases


def source_names(family: Family, name: str, with_base_prefix: bool) -> list[str]:
    """The inverse: a selfattn name (head-class form) -> every source name a rule maps to it, in table order
    (tables list the name transformers saves before its aliases). Several heads may share a target, e.g.
    RoBERTa's pooler and its classification head's dense layer: the caller picks the one its class has."""
    backbone_prefix = family.base_prefix + "." if with_base_prefix else ""
    candidates = []
    for rules, prefix in ((family.backbone, backbone_prefix), (family.head_tensors, "")):
        for rule in rules:
            if isinstance(rule, Rename):
                match = re.fullmatch(template_regex(rule.target), name)
                if match is not None:
                    candidates.append(prefix + fill(rule.source, match))
    return candidates


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints

SAFETENSORS_FILE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PYTORCH_FILE, PYTORCH_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
SINGLE_FILES = (SAFETENSORS_FILE, PYTORCH_FILE)
INDEX_FILES = (SAFETENSORS_INDEX, PYTORCH_INDEX)


def with_variant(name: str, variant: str | None) -> str:
    """The file name transformers gives a weight file of `variant`: the variant goes before the last suffix
    (model.fp16.safetensors, model.safetensors.index.fp16.json), as save_pretrained(variant=...) writes it."""
    if variant is None:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def check_weight_options(variant, use_safetensors) -> None:
    if variant is not None and (not isinstance(variant, str) or not variant or "/" in variant):
        raise ConversionError(
            f"variant={variant!r} is not a variant name: pass the string save_pretrained(variant=...) was given "
            "(e.g. variant='fp16' reads model.fp16.safetensors), or None for the files without a variant."
        )
    if use_safetensors not in (None, True, False):
        raise ConversionError(
            f"use_safetensors={use_safetensors!r} is not one of None (safetensors where there are, else PyTorch "
            "weights), True (safetensors only) or False (PyTorch weights only)."
        )


def weight_file_candidates(variant: str | None = None, use_safetensors: bool | None = None) -> list[str]:
    """The weight files transformers' from_pretrained looks for, in its order: safetensors (one file, then an
    index of shards) unless use_safetensors=False, then PyTorch's unless use_safetensors=True."""
    formats = []
    if use_safetensors is not False:
        formats += [SAFETENSORS_FILE, SAFETENSORS_INDEX]
    if not use_safetensors:
        formats += [PYTORCH_FILE, PYTORCH_INDEX]
    return [with_variant(name, variant) for name in formats]


def explicit_weights_file(folder: Path) -> str | None:
    """The weight file config.json names in "transformers_weights", which transformers reads instead of the usual
    names (variant and use_safetensors aside); None where it names none."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    name = read_json(config_path).get("transformers_weights")
    if name is None:
        return None
    inside = isinstance(name, str) and ".." not in Path(name).parts and not Path(name).is_absolute()
    if not inside or not name.endswith((".safetensors", ".safetensors.index.json")):
        raise ConversionError(
            f"{config_path} names transformers_weights={name!r}; transformers reads only a safetensors file "
            "(*.safetensors) or index (*.safetensors.index.json) inside the model folder there. Fix the field, or "
            "remove it to read the usual weight files."
        )
    return name


def missing_weights_advice(folder: Path, variant: str | None, use_safetensors: bool | None) -> str:
    """Why no weight file of `variant` and `use_safetensors` is there, where another choice of them would find one."""
    advice = []
    if use_safetensors is not None:
        others = [name for name in weight_file_candidates(variant) if (folder / name).is_file()]
        if others:
            advice.append(
                f"use_safetensors={use_safetensors} leaves out {others}; pass use_safetensors=None (the default) to "
                "read them"
            )
    if variant is not None:
        plain = [name for name in weight_file_candidates(None, use_safetensors) if (folder / name).is_file()]
        if plain:
            advice.append(f"there are weights without a variant ({plain}); pass variant=None to read those")
    else:
        variants = set()
        for name in weight_file_candidates(None, use_safetensors):
            stem, suffix = name.rsplit(".", 1)
            pattern = re.compile(re.escape(stem) + r"\.(.+?)(-\d+-of-\d+)?\." + re.escape(suffix))  # or a shard
            variants |= {match[1] for path in folder.iterdir() if (match := pattern.fullmatch(path.name))}
        if variants:
            names = " or ".join(f"variant={name!r}" for name in sorted(variants))
            advice.append(f"there are weights of a variant; pass {names} to read them")
    return "".join(f"; {line}" for line in advice)


def checkpoint_files(
    folder: str | os.PathLike, variant: str | None = None, use_safetensors: bool | None = None
) -> list[Path]:
    """The weight files of a checkpoint folder, chosen as transformers' from_pretrained chooses them: one file,
    or the shards an index names (safetensors first); `variant` and `use_safetensors` as from_pretrained takes
    them."""
    folder = Path(folder)
    check_weight_options(variant, use_safetensors)
    explicit = explicit_weights_file(folder)
    candidates = [explicit] if explicit is not None else weight_file_candidates(variant, use_safetensors)
    # A variant goes inside an index's name (model.safetensors.index.fp16.json), so the name's end does not tell.
    indexes = {with_variant(index, variant) for index in INDEX_FILES}
    if explicit is not None and explicit.endswith(".index.json"):
        indexes = {explicit}
    for name in candidates:
        path = folder / name
        if not path.is_file():
            continue
        if name not in indexes:
            return [path]
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(
                f"{path} has no \"weight_map\" of tensor names to shard files; re-download or re-save the checkpoint."
            )
        shards = sorted(set(weight_map.values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise ConversionError(f"{path} names shards that are not in the folder: {missing}.")
        return [folder / shard for shard in shards]
    present = sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []
    wanted = f"{candidates[0]}, which config.json names in transformers_weights" if explicit else (
        f"one of {candidates}"
    )
    raise ConversionError(
        f"No weights in {folder}: expected {wanted}; the folder holds {present}"
        + ("" if explicit else missing_weights_advice(folder, variant, use_safetensors)) + "."
    )


def load_checkpoint(
    folder: str | os.PathLike,
    progress: bool = False,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    weights_only: bool = True,
) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors or PyTorch checkpoint, sharded or not, of the files `checkpoint_files` picks.
    PyTorch files are read with torch.load(weights_only=...), True unless asked otherwise, as transformers reads
    them."""
    from tqdm.auto import tqdm

    files = checkpoint_files(folder, variant, use_safetensors)
    state_dict = {}
    for path in tqdm(files, desc="Reading shards", unit="file", disable=not progress or len(files) == 1):
        state_dict.update(read_weights(path, weights_only))
    return state_dict


def read_weights(path: Path, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of one weight file. A damaged file (a download cut short, a disk error) raises
    ConversionError naming the file, not the reader's bare error, which does not say which file it read."""
    from safetensors import SafetensorError

    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except OSError as error:
        raise ConversionError(
            f"Cannot read the weight file {path} ({error}); make it readable and run again."
        ) from error
    except SafetensorError as error:
        raise ConversionError(
            f"The weight file {path} is not a valid safetensors file ({error}); it is damaged or incomplete, "
            "e.g. a download cut short: re-download or re-save it."
        ) from error
    except Exception as error:  # torch.load's errors have no common base: zip, pickle, EOF, weights_only refusals
        raise ConversionError(
            f"The weight file {path} does not load as a PyTorch checkpoint with weights_only={weights_only} "
            f"({type(error).__name__}: {error}); if it is damaged or incomplete, re-download or re-save it "
            "(as safetensors where possible)."
        ) from error


def read_json(path: Path) -> dict:
    """A JSON object from a checkpoint file, or ConversionError naming the file and what is wrong with it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConversionError(f"Cannot read {path} ({error}); make it readable and run again.") from error
    except ValueError as error:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
        raise ConversionError(
            f"{path} is not valid JSON ({error}); it is damaged or incomplete: re-download or re-save it."
        ) from error
    if not isinstance(value, dict):
        raise ConversionError(
            f"{path} holds a JSON {type(value).__name__}, not an object; re-download or re-save it."
        )
    return value


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no config.json; pass the folder of a transformers checkpoint.")
    return read_json(path)


# A tokenizer's chat templates: save_pretrained of transformers 5 writes the default one to chat_template.jinja and
# the others to additional_chat_templates/NAME.jinja; processors wrote chat_template.json before that. Left behind,
# apply_chat_template of the converted model fails or, where the tokenizer_config.json holds an older template,
# silently renders another one.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TOKENIZER_FOLDERS = ("additional_chat_templates",)
# The files that make a tokenizer, as opposed to the chat templates it may carry.
TOKENIZER_MODEL_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",  # TokenizersBackend's (PreTrainedTokenizerFast's) vocab_file
    "source.spm",  # Marian: one SentencePiece model per language
    "target.spm",
    "target_vocab.json",  # Marian with separate_vocabs=True: the target language's vocabulary
)
TOKENIZER_FILES = TOKENIZER_MODEL_FILES + CHAT_TEMPLATE_FILES
HUB_FILE_PATTERNS = ["*.json", "*.txt", "*.model", "*.spm", "*.md", "*.jinja"]  # *.jinja: chat templates

# sentence-transformers keeps its pipeline beside the transformer's files: modules.json lists the modules (the
# transformer at the top of the folder, pooling, normalisation, dense layers... each in its own folder), and
# config_sentence_transformers.json and the transformer module's settings (sentence_bert_config.json, or the older
# per-architecture names its loader still reads) lie at the top.
SENTENCE_TRANSFORMERS_MODULES = "modules.json"
SENTENCE_TRANSFORMERS_TOP_FILES = ("config_sentence_transformers.json", "sentence_*_config.json")


def sentence_transformers_files(folder: str | os.PathLike) -> list[str]:
    """The sentence-transformers files of a checkpoint folder, relative to it: modules.json, the settings at the
    top, and the folder of every module modules.json places below the top; [] for a folder without modules.json.
    The transformer module at the top is the checkpoint the conversion reads and writes itself. Raises
    ConversionError where modules.json cannot be followed, rather than leave part of the pipeline behind."""
    folder = Path(folder)
    modules_file = folder / SENTENCE_TRANSFORMERS_MODULES
    if not modules_file.exists() and not modules_file.is_symlink():
        return []
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConversionError(
            f"Cannot read {modules_file} ({error}), the list of the sentence-transformers modules; make it readable "
            "valid JSON (re-download or re-save the model) and run again."
        ) from error
    if not isinstance(modules, list) or not all(
        isinstance(module, dict) and isinstance(module.get("path"), str) and isinstance(module.get("type"), str)
        for module in modules
    ):
        raise ConversionError(
            f"{modules_file} is not a list of modules with a \"path\" and a \"type\" each, as sentence-transformers "
            "writes it; re-download or re-save the model."
        )
    files = [SENTENCE_TRANSFORMERS_MODULES]
    for pattern in SENTENCE_TRANSFORMERS_TOP_FILES:
        files += sorted(path.name for path in folder.glob(pattern) if path.name not in files)
    for module in modules:
        path, kind = module["path"].strip("/"), module["type"]
        is_transformer = kind.rsplit(".", 1)[-1].endswith("Transformer")
        parts = Path(path).parts
        if Path(module["path"]).is_absolute() or ".." in parts:
            raise ConversionError(
                f"{modules_file} places the module {kind} at {module['path']!r}, outside the model folder; "
                "sentence-transformers refuses such paths too. Fix modules.json."
            )
        if not path:
            if not is_transformer:
                raise ConversionError(
                    f"{modules_file} places {kind} at the top of {folder}, where the conversion expects the "
                    "transformer; which of the files there belong to it cannot be told, so nothing is converted."
                )
            continue
        if is_transformer:
            raise ConversionError(
                f"{modules_file} places the transformer module ({kind}) in {path}/, so the weights sentence-"
                f"transformers runs are there, not the checkpoint at the top of {folder} that this command converts. "
                f"Convert {folder / path} instead, and copy the other sentence-transformers files into OUTPUT by hand."
            )
        location = folder / path
        if not location.exists() and not location.is_symlink():
            continue  # a module without files of its own (Normalize): it loads from the output as from the source
        if not location.is_dir() and not location.is_file():
            raise ConversionError(
                f"{location}, the folder of the sentence-transformers module {kind}, is a broken link or not a "
                "folder; put the module's files there and run again."
            )
        files.append(path)
    return files


def resolve_folder(
    source: str | os.PathLike,
    subfolder: str = "",
    use_safetensors: bool | None = None,
    variant: str | None = None,
    **download_kwargs,
) -> Path:
    """The folder of a checkpoint: `subfolder` of a local folder, or else of the Hub repository `source` names,
    downloaded (where a network is) with the files a conversion reads: configs, tokenizer files and the weights
    (safetensors, or PyTorch's where the repository has no safetensors weights of `variant`, or as
    `use_safetensors` asks)."""
    subfolder = check_subfolder(subfolder)
    if Path(source).is_dir():
        return Path(source) / subfolder
    from huggingface_hub import snapshot_download

    hub_kwargs = {name: value for name, value in download_kwargs.items() if value is not None}
    # Patterns are matched against paths in the repository, so a subfolder's files need its prefix.
    prefix = f"{subfolder}/" if subfolder else ""
    formats = {True: "*.safetensors", False: "*.bin"}  # by use_safetensors
    try:
        for safetensors in [True, False] if use_safetensors is None else [use_safetensors]:
            patterns = [prefix + pattern for pattern in HUB_FILE_PATTERNS + [formats[safetensors]]]
            folder = Path(snapshot_download(str(source), allow_patterns=patterns, **hub_kwargs)) / subfolder
            if any((folder / name).is_file() for name in weight_file_candidates(variant, safetensors)):
                break
        return folder
    except Exception as error:
        raise ConversionError(
            f"{source} is not a local folder and could not be fetched from the Hub ({type(error).__name__}: "
            f"{error}). Pass the folder of a downloaded checkpoint."
        ) from error


def check_subfolder(subfolder) -> str:
    """`subfolder` as from_pretrained takes it: a relative path inside the checkpoint, "" (or None) for its top."""
    if subfolder is None or subfolder == "":
        return ""
    if not isinstance(subfolder, str | os.PathLike) or Path(subfolder).is_absolute() or ".." in Path(subfolder).parts:
        raise ConversionError(
            f"subfolder={subfolder!r} is not a folder inside the checkpoint: pass a relative path such as "
            "subfolder='text_encoder', or leave it out for the checkpoint's top folder."
        )
    path = Path(subfolder).as_posix()
    return "" if path == "." else path


# ----------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class ConversionReport:
    source: str
    architecture: str
    target: str
    mapped: dict = field(default_factory=dict)  # source name -> target name
    dropped: dict = field(default_factory=dict)  # source name -> reason
    unused: dict = field(default_factory=dict)  # source name -> why nothing takes it
    missing: list = field(default_factory=list)  # target names no source tensor fills
    mismatched: list = field(default_factory=list)  # (source name, target name, source shape, target shape)
    conflicts: list = field(default_factory=list)  # (target name, source names whose tensors differ, why fatal)
    # Conversion: source config fields kept in the selfattn config's source_config for export, and those not carried
    # over at all (SOURCE_FOLDER_FIELDS).
    config_kept_for_export: list = field(default_factory=list)
    config_not_carried: list = field(default_factory=list)
    config_added: dict = field(default_factory=dict)  # selfattn config fields the source's model_type implied
    computed: dict = field(default_factory=dict)  # target name -> what export filled it with (no tensor of its own)
    # The decoding settings the generation config takes from config.json, where the source has no
    # generation_config.json (see `source_generation_config`).
    decoding_from_config: list = field(default_factory=list)
    # Export: the fields written as the conversion recorded them (source_config); those recorded but written with
    # the selfattn model's own values, which the record never overrides; those recorded for another family
    # (source_model_type), so left out; and the family's fields the selfattn config holds no value for, written with
    # their defaults.
    config_written_back: list = field(default_factory=list)
    config_recorded_but_replaced: list = field(default_factory=list)
    config_recorded_for_another_family: list = field(default_factory=list)
    config_defaulted: list = field(default_factory=list)
    dtype: str | None = None  # the dtype the tensors are written in, and why (see `weights_dtype`)

    def problems(self) -> list[str]:
        problems = [f"unused source tensor {name}: {why}" for name, why in self.unused.items()]
        problems += [f"missing target tensor {name}: no source tensor maps to it" for name in self.missing]
        problems += [
            f"shape mismatch: {source} {tuple(source_shape)} -> {target} expects {tuple(target_shape)}"
            for source, target, source_shape, target_shape in self.mismatched
        ]
        problems += [
            f"conflicting tensors {sources} all map to {target} but differ{why}"
            for target, sources, why in self.conflicts
        ]
        return problems

    def check(self) -> None:
        problems = self.problems()
        if problems:
            supported = ""
            if self.unused or self.missing:
                family = next((f for f in FAMILIES.values() if self.architecture.startswith(f.class_prefix)), None)
                if family is not None:
                    # On a line of its own: the problems are a list, and the advice is no part of the last one.
                    supported = (
                        "\nIf the checkpoint holds another head, pass its architecture (one of "
                        f"{supported_architectures(family)})."
                    )
            raise ConversionError(
                f"Cannot convert {self.source} ({self.architecture} -> {self.target}), {len(problems)} problem(s):\n  "
                + "\n  ".join(f"{problem}." for problem in problems)
                + supported
            )

    def summary(self) -> str:
        lines = [
            f"{self.source}: {self.architecture} -> {self.target}",
            f"  {len(self.mapped)} tensors mapped, {len(self.dropped)} dropped, {len(self.unused)} unused, "
            f"{len(self.missing)} missing, {len(self.mismatched)} shape mismatches",
        ]
        lines += [f"  dropped {name}: {why}" for name, why in self.dropped.items()]
        lines += [f"  computed {name}: {why}" for name, why in self.computed.items()]
        lines += [f"  {problem}" for problem in self.problems()]
        notes = {
            "config fields kept for export in source_config (no selfattn code uses them; export to this family writes "
            "them back)": self.config_kept_for_export,
            "config fields not carried over (they name files of the source folder, which the conversion does not "
            "copy)": self.config_not_carried,
            "config fields added (the source's model_type implied them)": self.config_added,
            "decoding settings read from config.json (there is no generation_config.json) and kept in the generation "
            "config": self.decoding_from_config,
            "config fields written back as the conversion recorded them (source_config)": self.config_written_back,
            "config fields source_config recorded, written with the selfattn model's own values instead (the model "
            "computes them so)": self.config_recorded_but_replaced,
            "config fields source_config recorded for export to another family (source_model_type), not written":
                self.config_recorded_for_another_family,
            "config fields written with the family's defaults (the selfattn config holds no value for them)":
                self.config_defaulted,
        }
        lines += [f"  {note}: {fields}" for note, fields in notes.items() if fields]
        if self.dtype:
            lines.append(f"  dtype: {self.dtype}")
        return "\n".join(lines)


def weights_dtype(state_dict: dict, config_dtype=None) -> tuple[torch.dtype | None, str]:
    """The dtype to write the tensors of `state_dict` in, and why: the one floating dtype they share, so that they
    are written bit for bit (a bfloat16 checkpoint stays bfloat16, not twice its size in float32); where they mix
    dtypes, the smallest that holds each of them exactly (torch.promote_types: float16 with bfloat16 gives float32).
    The tensors decide, not `config_dtype` (config.json's "dtype"), which describes them but may not: where the
    two disagree, the reason says so. (None, "") where no tensor is floating."""
    dtypes = sorted({tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()}, key=str)
    if not dtypes:
        return None, ""
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)

    def named(value) -> str:
        return str(value).removeprefix("torch.")

    if len(dtypes) > 1:
        why = f"it holds each of the source tensors' dtypes ({', '.join(map(named, dtypes))}) exactly"
    else:
        why = "the source tensors' own"
    if isinstance(config_dtype, str):
        config_dtype = getattr(torch, config_dtype, config_dtype)
    if config_dtype is not None and config_dtype != dtype:
        why += f"; config.json says {named(config_dtype)}, which they are not in"
    return dtype, f"{named(dtype)} ({why})"


class ExpectedTensors(NamedTuple):
    """What a model's checkpoint holds: `shapes` by name; `tied`, transformers' ties ({tied name: the name it
    repeats}); `one_tensor`, every name that holds the same tensor as another, tied or shared by construction
    ({name: the first name of that tensor}); `shared_module`, the names among those whose module is another's (the
    selfattn decoder takes the encoder's token table module), which no config setting unties."""

    shapes: dict
    tied: dict
    one_tensor: dict
    shared_module: frozenset


def expected_tensors(model: torch.nn.Module) -> ExpectedTensors:
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    # Names of one tensor: those of one object, and those tied (a model built on meta is tied already, but a tie
    # counts whether or not it was applied). The tensor goes by the first of its names that no tie makes a copy of.
    names = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    groups, group_of = {}, {}
    for name, tensor in names:
        group_of[name] = groups.setdefault(id(tensor), [])
        group_of[name].append(name)
    for name, repeated in tied.items():
        group, other = group_of.setdefault(name, [name]), group_of.setdefault(repeated, [repeated])
        if group is not other:
            group += other
            group_of.update({member: group for member in other})
    one_tensor = {}
    for group in {id(group): group for group in group_of.values()}.values():
        head = next((name for name in group if name not in tied), group[0])
        one_tensor.update({name: head for name in group if name != head})
    # transformers ties a parameter, not its module: a module met twice is one by construction.
    first_module, shared_module = {}, set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        if first_module.setdefault(id(module), prefix) != prefix:
            shared_module |= {f"{prefix}.{name}" for name, _ in module.named_parameters(recurse=False)}
            shared_module |= {f"{prefix}.{name}" for name, _ in module.named_buffers(recurse=False)}
    return ExpectedTensors(shapes, tied, one_tensor, frozenset(shared_module))


def build_on_meta(model_class: type, config) -> torch.nn.Module:
    with torch.device("meta"):
        return model_class(config)


def differ(first: torch.Tensor, second: torch.Tensor) -> bool:
    # Meta tensors (export_refusal's) have no values to compare; that check waits for the export itself.
    return not first.is_meta and not second.is_meta and not torch.equal(first, second)


def one_source_per_target(
    state_dict: dict, names: dict, expected: ExpectedTensors, aliases: dict, holder: str
) -> tuple[dict, dict, list]:
    """The rule for several source tensors that land on one tensor of `holder`, the model written (one target name,
    or names that are one tensor there: `expected.one_tensor`): ({source: target name} of the ones kept, {source:
    why dropped}, [(target name, sources, why they cannot all be kept)] conflicts). Equal tensors are one tensor
    saved twice: the first is kept. Where they differ, `aliases` ({source: why}, the family's `Alias` names) are
    dropped: transformers' model reads the other name then. If those left still differ, `holder` has no place for
    one of them, which is a conflict. The conversion and from_pretrained's loading both apply this rule."""
    groups = {}
    for source, target in names.items():
        groups.setdefault(expected.one_tensor.get(target, target), []).append(source)
    kept, dropped, conflicts = {}, {}, []
    for target, sources in groups.items():
        read = sources
        if any(differ(state_dict[sources[0]], state_dict[source]) for source in sources[1:]):
            read = [source for source in sources if source not in aliases] or sources
        first = read[0]
        kept[first] = target
        for source in sources:
            if source in read:
                if source != first and not differ(state_dict[first], state_dict[source]):
                    tie = expected.tied.get(names[source])
                    dropped[source] = (
                        f"maps to {names[source]}, tied to {tie} (the source model ties them too)" if tie else
                        f"repeats {first} (both are {target})"
                    )  # fmt: skip
            elif differ(state_dict[first], state_dict[source]):
                dropped[source] = f"{aliases[source]}; it differs from {first}, which transformers' model reads"
            else:
                dropped[source] = f"repeats {first} (both are {target})"
        differing = [source for source in read if source != first and source not in dropped]
        if differing:
            why = conflict_reason(target, [names[source] for source in (first, *differing)], expected, holder)
            # The aliases left out are said here too: the error lists the conflicts, not what was dropped.
            why += "".join(f"; {source} is left out: {dropped[source]}" for source in sources if source not in read)
            conflicts.append((target, [first, *differing], why))
    return kept, dropped, conflicts


def conflict_reason(target: str, targets: list[str], expected: ExpectedTensors, holder: str) -> str:
    """Why `holder` cannot keep source tensors that differ, mapped to `targets`, all of them `target`'s tensor."""
    others = sorted({name for name in targets if name != target})
    if not others:
        return ""  # one name of `holder` for several of the source's: the table says which is read (`Alias`)
    if not any(name in expected.shared_module for name in others):
        return (
            f": {holder} ties {', '.join(others)} to {target} (tie_word_embeddings=True in the config), one tensor "
            "for them, while transformers' own model unties tensors that differ; set \"tie_word_embeddings\": false "
            "in the source's config.json to convert them as separate tensors"
        )
    return (
        f": {holder} holds {target} and {', '.join(others)} as one tensor (one module, e.g. one token table for "
        "the encoder and the decoder), so it has no place for tensors that differ, and the checkpoint cannot be "
        "converted"
    )


def match_tensors(
    report: ConversionReport,
    state_dict: dict,
    names: dict,
    expected: ExpectedTensors,
    aliases: dict | None = None,
    progress: bool = False,
) -> dict:
    """Put the source tensors under their target names, recording in `report` everything that does not fit; where
    several land on one target tensor, `one_source_per_target` decides (`aliases` as it takes them)."""
    from tqdm.auto import tqdm

    shapes, candidates = expected.shapes, {}
    for source, target in tqdm(names.items(), desc="Mapping tensors", unit="tensor", disable=not progress):
        shape = tuple(state_dict[source].shape)
        if target not in shapes:
            report.unused[source] = f"maps to {target}, which {report.target} does not have"
        elif shape != shapes[target]:
            report.mismatched.append((source, target, shape, shapes[target]))
        else:
            candidates[source] = target
    kept, dropped, conflicts = one_source_per_target(state_dict, candidates, expected, aliases or {}, report.target)
    report.mapped.update(kept)
    report.dropped.update(dropped)
    report.conflicts += conflicts
    converted = {target: state_dict[source] for source, target in kept.items()}
    filled = set(converted) | {expected.one_tensor.get(target, target) for _, target, _, _ in report.mismatched}
    # A name that repeats another tensor is filled with it.
    report.missing = sorted(name for name in shapes if name not in filled and name not in expected.one_tensor)
    return converted


# ----------------------------------------------------------------------------------------------------------------
# BERT family -> selfattn


def convert_checkpoint(
    source: str | os.PathLike, architecture: str | None = None, progress: bool = False
) -> tuple[torch.nn.Module, ConversionReport]:
    """Load a BERT-family checkpoint folder (or Hub id) as the matching selfattn model, in eval mode.

    `architecture` overrides config.json's (e.g. BertForPreTraining for a checkpoint that holds both pre-training
    heads but names BertForMaskedLM). Raises ConversionError listing every unmapped, missing or mis-shaped tensor."""
    folder = resolve_folder(source)
    config_dict = read_config(folder)
    family = family_for(config_dict.get("model_type"))
    architecture = architecture or source_architecture(family, config_dict)
    head = head_for(family, architecture)
    kwargs, not_carried = selfattn_config_kwargs(config_dict, architecture)
    added = model_type_tokenizer_class(folder, config_dict)
    config = SelfAttnConfig(**{**kwargs, **added}, architectures=[head.target])
    model_class = target_class(head.target)
    expected = expected_tensors(build_on_meta(model_class, config))

    state_dict = load_checkpoint(folder, progress)
    report = ConversionReport(
        str(source), architecture, head.target, config_kept_for_export=sorted(kwargs["source_config"] or {}),
        config_not_carried=not_carried, config_added=added,
    )
    names, report.dropped, unmatched, aliases = rename(family, state_dict, head_prefix_for(head.target))
    report.unused.update({name: f"no {family.name} rule maps it" for name in unmatched})
    converted = match_tensors(report, state_dict, names, expected, aliases, progress)
    report.check()
    # from_pretrained's dtype="auto" goes by config.json's dtype first, which may not be the tensors'.
    dtype, report.dtype = weights_dtype(converted, config_dict.get("dtype", config_dict.get("torch_dtype")))
    if dtype is not None:
        config.dtype = dtype
    # transformers saves a config with output_attentions=True only for eager attention, which returns the weights.
    attention = {"attn_implementation": "eager"} if config.output_attentions else {}
    model = model_class.from_pretrained(None, config=config, state_dict=converted, dtype=dtype or "auto", **attention)
    if model.can_generate():
        model.generation_config = source_generation_config(folder)
        if not (folder / "generation_config.json").is_file():
            report.decoding_from_config = decoding_settings(model.generation_config)
    return model.eval(), report


def model_type_tokenizer_class(folder: Path, config_dict: dict) -> dict:
    """{"tokenizer_class": the family's tokenizer class (`Family.tokenizer_class`)} where neither the source's
    config.json nor its tokenizer_config.json names one (older Hub layouts: vocab.txt and a tokenizer_config.json of
    settings). AutoTokenizer then goes by model_type, which the selfattn config no longer has; it reads the class
    from the config instead. {} where the source names the class."""
    tokenizer_config = Path(folder) / "tokenizer_config.json"
    if config_dict.get("tokenizer_class") or (
        tokenizer_config.is_file() and read_json(tokenizer_config).get("tokenizer_class")
    ):
        return {}
    return {"tokenizer_class": family_for(config_dict.get("model_type")).tokenizer_class}


def source_generation_config(folder: Path):
    """The source's decoding defaults (generation_config.json, else those its config.json holds, as transformers
    reads them), so that generate() on the converted model decodes as the source model does."""
    from transformers import GenerationConfig

    if (Path(folder) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    # Checkpoints older than generation_config.json keep num_beams, max_length... in config.json. transformers'
    # from_pretrained reads them from the file itself (GenerationConfig.from_pretrained(folder, config_file_name=
    # "config.json", _from_model_config=True), which is from_model_config of its JSON): the model config AutoConfig
    # builds has dropped them.
    return GenerationConfig.from_model_config(read_config(folder))


def decoding_settings(generation_config) -> list[str]:
    """The fields of `generation_config` that hold other values than GenerationConfig's defaults."""
    from transformers.generation.configuration_utils import METADATA_FIELDS

    return sorted(name for name in generation_config.to_diff_dict() if name not in METADATA_FIELDS)


# from_pretrained arguments that say where and how to read the weights, which the foreign path reads itself, and
# takes out of what it hands on: transformers' from_pretrained then loads from the converted state dict, which
# they have no meaning for (a subfolder left in would be looked for again inside the resolved folder).
WEIGHT_READING_KWARGS = ("subfolder", "variant", "use_safetensors", "key_mapping")
# What from_pretrained passes on to the Hub.
DOWNLOAD_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


def refuse_unreadable_formats(source, model_type: str, kwargs: dict) -> None:
    """Formats transformers' from_pretrained names but that a BERT-family checkpoint is not converted from."""
    if kwargs.get("gguf_file") is not None:
        raise ConversionError(
            f"gguf_file={kwargs['gguf_file']!r}: {source} is a {model_type} checkpoint, which selfattn reads from its "
            "safetensors or PyTorch weights, and transformers reads no GGUF file of this family either. Leave out "
            "gguf_file to load the folder's weights."
        )
    for name in ("from_tf", "from_flax"):
        if kwargs.get(name):
            # transformers 5 drops these silently and reads the PyTorch weights: say so instead.
            raise ConversionError(
                f"{name}=True: TensorFlow and Flax weights are not read (transformers 5 reads neither); "
                f"{source} is loaded from its safetensors or PyTorch weights. Leave out {name}, or convert the "
                "weights to PyTorch with transformers 4 first."
            )


def mapped_keys(state_dict: dict, key_mapping) -> dict:
    """`state_dict` with its names renamed by from_pretrained's `key_mapping` ({regex: replacement}), applied as
    transformers applies it, to the checkpoint's own names, before the family's names are mapped to selfattn's."""
    if key_mapping is None:
        return state_dict
    if not isinstance(key_mapping, dict) or not all(
        isinstance(pattern, str) and isinstance(target, str) for pattern, target in key_mapping.items()
    ):
        raise ConversionError(
            f"key_mapping={key_mapping!r} is not a dict of regular expressions to replacements (both str), e.g. "
            "{'^encoder\\.': 'bert.encoder.'}, which renames the checkpoint's tensors before they are loaded."
        )
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    renamings = [
        WeightRenaming(source_patterns=source, target_patterns=target)
        for source, target in key_mapping.items()
    ]
    renamed = {}
    for name, tensor in state_dict.items():
        new_name = apply_renamings(name, renamings)
        if new_name in renamed:
            raise ConversionError(
                f"key_mapping={key_mapping!r} renames two tensors of the checkpoint to {new_name!r}; make the "
                "patterns tell them apart."
            )
        renamed[new_name] = tensor
    return renamed


def foreign_checkpoint_kwargs(model_class: type, source, kwargs: dict) -> dict | None:
    """from_pretrained arguments that load a BERT-family checkpoint into `model_class`, or None when `source` is
    not one (then from_pretrained proceeds as usual). Tensors the class has no place for are left under their
    source names, so that transformers reports them as unexpected, and missing heads are initialised as usual.
    The weights are the ones transformers' own class would read: `subfolder`, `variant`, `use_safetensors`,
    `weights_only` and `key_mapping` are honoured as its from_pretrained honours them."""
    download_kwargs = {name: kwargs.get(name) for name in DOWNLOAD_KWARGS}
    subfolder = check_subfolder(kwargs.get("subfolder"))
    if Path(source).is_dir():
        config_path = Path(source) / subfolder / "config.json"
        if not config_path.is_file():
            return None
        model_type = read_json(config_path).get("model_type")
    else:
        from transformers.utils import cached_file

        hub_kwargs = {name: value for name, value in download_kwargs.items() if value is not None}
        try:
            config_file = cached_file(
                str(source), "config.json", subfolder=subfolder, _raise_exceptions_for_missing_entries=False,
                **hub_kwargs,
            )
        except OSError:
            return None  # from_pretrained reports the unreachable source in its own words
        if config_file is None:
            return None
        model_type = read_json(Path(config_file)).get("model_type")
    if model_type not in FAMILIES:
        return None
    refuse_unreadable_formats(source, model_type, kwargs)
    use_safetensors = kwargs.get("use_safetensors")
    check_weight_options(kwargs.get("variant"), use_safetensors)
    folder = resolve_folder(source, subfolder, use_safetensors, kwargs.get("variant"), **download_kwargs)
    family = FAMILIES[model_type]
    head = family.heads[architecture_for(family, model_class.__name__).removeprefix(family.class_prefix)]
    state_dict = load_checkpoint(
        folder, variant=kwargs.get("variant"), use_safetensors=use_safetensors,
        weights_only=kwargs.get("weights_only", True),
    )
    state_dict = mapped_keys(state_dict, kwargs.get("key_mapping"))
    from transformers import PreTrainedConfig

    names, dropped, unmatched, aliases = rename(family, state_dict, head_prefix_for(model_class.__name__))
    # The config is read from the folder (SelfAttnConfig translates it); the class's head fields override it.
    config_fields = {name: value for name, value in head.config.items() if not isinstance(value, SourceField)}
    config = kwargs.get("config")
    if not isinstance(config, PreTrainedConfig):
        # With the overrides from_pretrained will apply (tie_word_embeddings=False unties the LM head, ...).
        overrides = {name: kwargs[name] for name in kwargs if name in SelfAttnConfig.__dataclass_fields__}
        overrides.pop("dtype", None)
        config = SelfAttnConfig.from_pretrained(folder, **{**config_fields, **overrides})
    # Several tensors landing on one of the model's (aliases, a table both stacks share) follow the conversion's
    # rule, not the file's order: transformers would load them all and keep the last.
    report = ConversionReport(str(source), architecture_for(family, model_class.__name__), model_class.__name__)
    kept, report.dropped, report.conflicts = one_source_per_target(
        state_dict, names, expected_tensors(build_on_meta(model_class, config)), aliases, model_class.__name__
    )
    report.check()
    for name, reason in {**dropped, **report.dropped}.items():
        logger.info("Not loading %s from %s: %s.", name, source, reason)
    converted = {target: state_dict[name] for name, target in kept.items()}
    converted.update({name: state_dict[name] for name in unmatched})
    passed_on = {name: value for name, value in kwargs.items() if name not in WEIGHT_READING_KWARGS}
    if kwargs.get("config") is not None:
        if not isinstance(kwargs["config"], PreTrainedConfig) and subfolder:
            # A config given by name or path is read from its own subfolder, as transformers reads it.
            passed_on["subfolder"] = subfolder
        return {**passed_on, "state_dict": converted}
    return {**config_fields, **passed_on, "config": str(folder), "state_dict": converted}


# ----------------------------------------------------------------------------------------------------------------
# Warm-starting an encoder-decoder from encoder checkpoints

# The encoder's token table, which the warm-started decoder and LM head share.
TOKEN_TABLE = "model.encoder.embeddings.word_embeddings.weight"
# One config describes both stacks, so the two checkpoints must agree on these.
SHARED_STACK_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "position_offset",
    "padding_aware_positions",
    "type_vocab_size",
    "embedding_size",
    "layer_norm_eps",
)


def encoder_checkpoint(source, download_kwargs: dict) -> tuple[dict, dict, dict]:
    """(SelfAttnConfig fields, {selfattn encoder name: tensor}, {MLM head name: tensor}) of a BERT-family or
    selfattn encoder checkpoint; the MLM head's tensors are there when the checkpoint has that head (its
    projection, tied to the token table, left out); other tensors (pooler, task heads) are left out and logged."""
    folder = resolve_folder(source, **download_kwargs)
    config_dict = read_config(folder)
    state_dict = load_checkpoint(folder)
    if config_dict.get("model_type") == SelfAttnConfig.model_type:
        config_kwargs = SelfAttnConfig.from_pretrained(folder).to_dict()
        names = {name: name if name.startswith(("model.", "lm_head.")) else f"model.{name}" for name in state_dict}
    else:
        family = family_for(config_dict.get("model_type"))
        config_kwargs, _ = selfattn_config_kwargs(config_dict, family.architecture("Model"))
        names, _, unmatched, _ = rename(family, state_dict, head_prefix="model.")
        names.update({name: name for name in unmatched})
    encoder = {target: state_dict[name] for name, target in names.items() if target.startswith("model.encoder.")}
    lm_head = {
        target: state_dict[name]
        for name, target in names.items()
        if target.startswith("lm_head.") and target != "lm_head.decoder.weight"
    }
    left_out = sorted(
        name for name, target in names.items() if not target.startswith("model.encoder.") and target not in lm_head
    )
    if left_out:
        logger.info("Warm start from %s uses its encoder and MLM head only; not used: %s.", source, left_out)
    table = encoder.get(TOKEN_TABLE)
    for name, target in names.items():
        if target == "lm_head.decoder.weight" and table is not None and not torch.equal(state_dict[name], table):
            logger.warning(
                "Warm start from %s: its MLM projection %s is a matrix of its own (tie_word_embeddings=False), which "
                "is not used: the warm-started LM head projects with the token table. Convert the masked LM itself "
                "(selfattn-convert bert) to keep it.",
                source, name,
            )
    return config_kwargs, encoder, lm_head


def warm_start_kwargs(encoder_source, decoder_source=None, **kwargs) -> dict:
    """from_pretrained arguments for an encoder-decoder whose encoder comes from `encoder_source` and whose decoder
    self-attention, FFN and embeddings come from `decoder_source` (the same checkpoint by default), with BERT's
    MLM head as the LM head (`lm_head_transform`: the decoder source's own where it has one); the cross-attention,
    and a head the source lacks, are left for from_pretrained to initialise (and report as newly initialised).
    The two stacks share one token table, the encoder's. `kwargs` override config fields (e.g.
    decoder_start_token_id, or lm_head_transform=False for a plain projection) or go to from_pretrained (e.g.
    dtype)."""
    download_kwargs = {name: kwargs.get(name) for name in DOWNLOAD_KWARGS}
    encoder_config, encoder, lm_head = encoder_checkpoint(encoder_source, download_kwargs)
    if decoder_source is None or str(decoder_source) == str(encoder_source):
        # Copies: from_pretrained keeps the given tensors, and shared ones would tie the two stacks together.
        decoder_config, decoder = encoder_config, {name: tensor.clone() for name, tensor in encoder.items()}
    else:
        decoder_config, decoder, lm_head = encoder_checkpoint(decoder_source, download_kwargs)
    disagreements = [
        f"{name}: {encoder_config.get(name)!r} vs {decoder_config.get(name)!r}"
        for name in SHARED_STACK_FIELDS
        if encoder_config.get(name) != decoder_config.get(name)
    ]
    if disagreements:
        raise ConversionError(
            f"{encoder_source} and {decoder_source} cannot share one selfattn config: " + "; ".join(disagreements)
            + ". Pick checkpoints of the same shape."
        )
    state_dict = dict(encoder)
    for name, tensor in decoder.items():
        if name == TOKEN_TABLE:
            if not torch.equal(tensor, encoder[TOKEN_TABLE]):
                logger.info("The decoder shares the encoder's token table; %s's own is not used.", decoder_source)
            continue
        state_dict["model.decoder." + name.removeprefix("model.encoder.")] = tensor
    fields = SelfAttnConfig.__dataclass_fields__
    config_fields = {name: value for name, value in encoder_config.items() if name in fields}
    # source_model_type None: no family has this encoder-decoder's layout, so export picks one by its shape; the
    # encoder checkpoint's source_config describes that checkpoint's family, so it goes too.
    config_fields.update(
        decoder_layers=decoder_config["encoder_layers"], tie_word_embeddings=True, add_pooling_layer=False,
        lm_head_transform=True, source_model_type=None, source_config=None,
    )
    config_fields.update({name: kwargs.pop(name) for name in list(kwargs) if name in fields})
    if config_fields["lm_head_transform"]:
        state_dict.update(lm_head)
    return {**kwargs, "config": SelfAttnConfig(**config_fields), "state_dict": state_dict}


def warm_start_encoder_decoder(encoder_source, decoder_source=None, **kwargs):
    """A SelfAttnForConditionalGeneration warm-started from encoder checkpoints (BERT-family or selfattn; BERT2BERT):
    the encoder from `encoder_source`, the decoder's self-attention, FFN and embeddings from `decoder_source`
    (default: the same checkpoint), the cross-attention newly initialised. Set `decoder_start_token_id` (e.g. the
    [CLS] id) to train from labels. transformers' EncoderDecoderModel.from_encoder_decoder_pretrained does the same
    for its own classes."""
    model_class = selfattn_model.SelfAttnForConditionalGeneration
    return model_class.from_pretrained(None, **warm_start_kwargs(encoder_source, decoder_source, **kwargs))


# ----------------------------------------------------------------------------------------------------------------
# selfattn -> BERT family


def shape_families(config: SelfAttnConfig) -> dict[str, Family]:
    """The families export can write for this model's shape, in the order it tries them when no family is named
    or recorded."""
    if not config.encoder_layers:
        raise ConversionError(
            "This is a decoder-only selfattn model (encoder_layers=0); export writes encoder layouts "
            f"({sorted(ENCODER_FAMILIES)}) and encoder-decoder ones ({sorted(SEQ2SEQ_FAMILIES)}), none of which it has."
        )
    return SEQ2SEQ_FAMILIES if config.decoder_layers else ENCODER_FAMILIES


def export_family(config: SelfAttnConfig, family_name: str | None = None) -> Family | None:
    """The family to export to: as named, else the one the model was converted from (its config's
    `source_model_type`); None where neither says (a model trained from scratch or converted by an older release),
    and export takes the first of `shape_families` that can take the model."""
    families = shape_families(config)
    if family_name is None:
        # An XLM-R model has RoBERTa's shape, and an ELECTRA generator without projection BERT's: only the record
        # tells them apart.
        return families.get(config.source_model_type)
    family = family_for(family_name)
    if family.model_type not in families:
        shape = "encoder-decoder" if config.decoder_layers else "encoder-only"
        raise ConversionError(
            f"This selfattn model is {shape}, and {family_name} is not: pick one of {sorted(families)} with --family "
            "(or leave --family out to let export choose)."
        )
    return family


def computed_tensors(family: Family, config: SelfAttnConfig, report: "ConversionReport", is_base: bool) -> dict:
    """The family's computed tensors (`Family.export_tensors`) for the names `report` lists as missing; those names
    move from `report.missing` to `report.computed`."""
    if family.export_tensors is None:
        return {}
    filled = {}
    for name, (tensor, why) in family.export_tensors(config.to_dict()).items():
        if is_base:
            name = name.removeprefix(family.base_prefix + ".")
        if name in report.missing:
            filled[name] = tensor
            report.computed[name] = why
    report.missing = [name for name in report.missing if name not in filled]
    return filled


def export_checkpoint(source: str | os.PathLike, family_name: str | None = None, progress: bool = False):
    """A selfattn folder -> (transformers config, state dict in the family's layout, report). Encoder-only models
    export to the BERT families, encoder-decoders to Marian or BART: to `family_name`, else to the family the model
    was converted from, else to the first family that takes it. Where the family cannot take the model, the error
    names those that can."""
    folder = Path(source)
    model_type = read_config(folder).get("model_type")
    if model_type != SelfAttnConfig.model_type:
        raise ConversionError(
            f"{source} holds a {model_type!r} checkpoint, not a selfattn one; export takes the folder that "
            "selfattn-convert bert or save_pretrained of a selfattn model wrote."
        )
    config = SelfAttnConfig.from_pretrained(folder)
    if config.pruned_heads:
        # transformers 5 dropped pruned_heads from its configs: the models export writes build every layer with all
        # heads.
        pruned = ", ".join(f"{key}: heads {heads}" for key, heads in config.pruned_heads.items())
        raise ConversionError(
            f"{source} has pruned attention heads ({pruned}); transformers' models cannot express pruned heads "
            "(every layer has num_attention_heads), so there is no layout to export to. Export the model before "
            "pruning, or keep the pruned model as a selfattn folder (it loads with trust_remote_code)."
        )
    family = export_family(config, family_name)
    state_dict = load_checkpoint(folder, progress)
    families = shape_families(config)
    if family is None:
        refusals = {}
        for candidate in families.values():
            refusal = export_refusal(source, config, state_dict, candidate)
            if refusal is None:
                try:
                    return export_state_dict(source, config, state_dict, candidate, progress)
                except ConversionError as error:  # what only the values show (tensors that conflict)
                    refusal = error
            refusals[candidate.name] = refusal
        raise ConversionError(
            f"No export family takes {source}: its config does not record the family it was converted from "
            f"(source_model_type), and every --family refuses it:\n"
            + "\n".join(f"{name}: {error}" for name, error in refusals.items())
        )
    try:
        return export_state_dict(source, config, state_dict, family, progress)
    except ConversionError as error:
        fitting = [
            name
            for name, other in families.items()
            if other is not family and export_refusal(source, config, state_dict, other) is None
        ]
        chosen = (
            f"--family {family.name}" if family_name is not None else
            f"{family.name}, the family it was converted from (source_model_type in its config.json and export's "
            "default),"
        )
        advice = f"pass --family {' or --family '.join(fitting)}" if fitting else "no other --family takes it either"
        raise ConversionError(f"{error}\n{chosen} cannot take this model as it is; {advice}.") from error


def export_refusal(source, config: SelfAttnConfig, state_dict: dict, family: Family) -> ConversionError | None:
    """Why export to `family` fails, or None where it takes the model, told from the config and the tensors' names
    and shapes alone: the export runs on meta tensors, which hold no values, so no stored tensor is read, copied or
    compared, and nothing is written. Cheap enough to ask of every family when naming the ones that fit."""
    shapes_only = {name: tensor.to("meta") for name, tensor in state_dict.items()}
    try:
        export_state_dict(source, config, shapes_only, family)
    except ConversionError as error:
        return error
    return None


def export_state_dict(source, config: SelfAttnConfig, state_dict: dict, family: Family, progress: bool = False):
    """(transformers config, state dict, report) of the selfattn model (`config`, `state_dict`) in `family`'s
    layout; ConversionError where the family cannot express it."""
    import transformers
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    source_fields = source_config_dict(config, family)
    architecture = source_fields["architectures"][0]
    try:
        source_config = AutoConfig.for_model(**source_fields)
    except (StrictDataclassError, TypeError, ValueError) as error:  # transformers' checks of its config's values
        raise ConversionError(
            f"This selfattn config has no {family.name} equivalent: {type(error).__name__}: {error}"
        ) from error
    expected = expected_tensors(build_on_meta(getattr(transformers, architecture), source_config))
    shapes = expected.shapes
    is_base = architecture == family.architecture("Model")
    names, unmatched = {}, []
    for name in state_dict:
        candidates = source_names(family, name if not is_base else "model." + name, with_base_prefix=not is_base)
        if candidates:
            names[name] = next((candidate for candidate in candidates if candidate in shapes), candidates[0])
        else:
            unmatched.append(name)
    source_class = config.architectures[0] if config.architectures else "SelfAttnModel"
    report = ConversionReport(str(source), source_class, architecture)
    recorded = recorded_source_config(config, family)
    report.config_written_back = sorted(name for name, value in recorded.items() if source_fields[name] == value)
    report.config_recorded_but_replaced = sorted(
        name for name, value in recorded.items() if source_fields[name] != value
    )
    if config.source_model_type != family.model_type:
        report.config_recorded_for_another_family = sorted(config.source_config or {})
    # A model trained from scratch, converted by an older release or from another family holds no value for them.
    report.config_defaulted = unmapped_fields(source_config.to_dict(), set(source_fields))
    report.unused.update({name: f"no {family.name} rule produces it" for name in unmatched})
    converted = match_tensors(report, state_dict, names, expected, progress=progress)
    converted.update(shared_copies(family, config, state_dict, report, is_base))
    # The stored tensors go as they are and decide the config's dtype. The computed ones stay float32, as selfattn
    # computes them in any dtype (its sinusoidal table is a float32 buffer): rounded to bfloat16 they would give
    # transformers' model other positions than selfattn's, and from_pretrained casts them to the dtype it loads in.
    dtype, report.dtype = weights_dtype(state_dict, config.dtype)
    if dtype is not None:
        source_config.dtype = dtype
    converted.update(computed_tensors(family, config, report, is_base))
    report.check()
    return source_config, converted, report


def shared_copies(family: Family, config: SelfAttnConfig, state_dict: dict, report, is_base: bool) -> dict:
    """selfattn saves a tensor its model holds under several names (one token table for both stacks and, tied, the
    LM head; one MLM decoder bias) once; a family that keeps copies under several names (Marian and BART with
    tie_word_embeddings=False, BERT's and RoBERTa's two MLM biases) gets it under each name `report` lists as
    missing; those names move to `report.computed`."""
    model = build_on_meta(target_class((config.architectures or ["SelfAttnModel"])[0]), config)
    one_tensor = expected_tensors(model).one_tensor
    groups = {}
    for name in model.state_dict():
        groups.setdefault(one_tensor.get(name, name), []).append(name)
    names = {name: name for name in state_dict}
    for group in groups.values():
        stored = next((name for name in group if name in state_dict), None)
        if stored is not None:
            names.update({name: stored for name in group})
    filled = {}
    for name, stored in names.items():
        for candidate in source_names(family, name if not is_base else "model." + name, with_base_prefix=not is_base):
            if candidate in report.missing and candidate not in filled:
                filled[candidate] = state_dict[stored].clone()  # safetensors writes no shared memory
                # Named as written, and as the selfattn model has it, which may be the same name.
                written = report.mapped.get(stored)
                report.computed[candidate] = (
                    f"a copy of {written} (both hold the selfattn model's {stored})" if written else
                    f"a copy of the selfattn model's {stored}"
                )  # fmt: skip
    report.missing = [name for name in report.missing if name not in filled]
    return filled


# ----------------------------------------------------------------------------------------------------------------
# Parity


SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need.",
    "A padded batch checks that masking matches: this sentence is the longest of the three by some way.",
)


SAMPLE_LENGTH = 64  # tokens, more than the sample texts need


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def last_hidden_state(output) -> torch.Tensor:
    return output.last_hidden_state if "last_hidden_state" in output else output.hidden_states[-1]


def compare_outputs(reference, ours, attention_mask: torch.Tensor) -> dict[str, float]:
    """Max abs difference of the last hidden state and of every output tensor both models return (logits,
    pooled output, ...), by field name; transformers' heads and selfattn's use the same names. Per-token outputs
    are compared at real tokens only: at padding positions selfattn defines its output as the embedding output,
    while transformers' models leave whatever their layers computed there. Both outputs need hidden_states (run
    with output_hidden_states=True)."""
    real = attention_mask.reshape(-1, attention_mask.shape[-1]).bool()

    def diff(expected: torch.Tensor, actual: torch.Tensor) -> float:
        if tuple(expected.shape[:2]) == tuple(real.shape):
            expected, actual = expected[real], actual[real]
        return max_abs_diff(expected, actual)

    diffs = {"last_hidden_state": diff(last_hidden_state(reference), last_hidden_state(ours))}
    for name, value in reference.items():
        if name in ("hidden_states", "attentions", "loss", "last_hidden_state") or not isinstance(value, torch.Tensor):
            continue
        if name not in ours:
            raise ConversionError(f"The selfattn model returns no {name!r}, which the source model does.")
        diffs[name] = diff(value, ours[name])
    return diffs


def sample_inputs(folder: Path, config, positions: int, texts=SAMPLE_TEXTS, multiple_choice: bool = False) -> dict:
    """A padded batch of `texts` from the checkpoint's tokenizer (random ids where it has none), truncated to
    SAMPLE_LENGTH tokens (rounded up to whole feed-forward chunks), or to the `positions` both models have."""
    # transformers' models refuse a length that their feed-forward chunks (chunk_size_feed_forward) do not divide,
    # so the batch is padded, and truncated, to a multiple of them.
    chunk = getattr(config, "chunk_size_feed_forward", 0) or 0
    multiple = max(chunk, 1)
    length = min(math.ceil(SAMPLE_LENGTH / multiple), positions // multiple) * multiple
    if length == 0:
        raise ConversionError(
            f"--verify cannot run transformers' model: with chunk_size_feed_forward={chunk} it refuses any input "
            f"whose length is not a multiple of {chunk}, and its position table (max_position_embeddings, less any "
            f"rows the family reserves) takes only {positions} tokens. Leave out --verify, or set "
            f"chunk_size_feed_forward in config.json to 0 or at most {positions} first."
        )
    if any((folder / name).is_file() for name in TOKENIZER_MODEL_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        inputs = dict(
            tokenizer(
                list(texts), padding=True, pad_to_multiple_of=multiple, truncation=True, max_length=length,
                return_tensors="pt",
            )
        )
    else:
        generator = torch.Generator().manual_seed(0)
        lengths = [min(real, length) for real in (12, 7, 9)]
        width = math.ceil(max(lengths) / multiple) * multiple
        input_ids = torch.randint(3, config.vocab_size, (len(lengths), width), generator=generator)
        attention_mask = torch.zeros_like(input_ids)
        for row, real in enumerate(lengths):
            attention_mask[row, :real] = 1
        input_ids = input_ids.masked_fill(attention_mask == 0, config.pad_token_id)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if multiple_choice:
        inputs = {name: tensor.unsqueeze(0) for name, tensor in inputs.items()}
    return inputs


@contextmanager
def in_float32(model: torch.nn.Module):
    """`model` in float32 for the parity check, handed back afterwards in the dtypes it had. The source model runs
    in float32 too (from_pretrained(dtype=float32)), so a bfloat16 or float16 conversion is compared with the same
    figures and --tolerance as a float32 one: both models hold the same values (float32 holds every bfloat16 and
    float16 value exactly), and only their arithmetic is compared. Casting back is exact for the same reason, so
    the model that is then saved keeps the source's dtype bit for bit."""
    dtypes = [
        (module, kind, name, tensor.dtype)
        for module in model.modules()
        for kind in ("_parameters", "_buffers")
        for name, tensor in getattr(module, kind).items()
        if tensor is not None
    ]
    model.float()
    try:
        yield model
    finally:
        for module, kind, name, dtype in dtypes:
            tensor = getattr(module, kind)[name]
            if kind == "_parameters":
                tensor.data = tensor.data.to(dtype)  # the same Parameter object: ties stay tied
            else:
                module._buffers[name] = tensor.to(dtype)


def verify(source: str | os.PathLike, model: torch.nn.Module, texts=SAMPLE_TEXTS) -> dict[str, float]:
    """Run the source transformers model and `model` on a padded batch of `texts`; max abs differences per output,
    plus "mean_pooled" (the masked mean of the last hidden state: sentence embeddings)."""
    import transformers

    folder = resolve_folder(source)
    config_dict = read_config(folder)
    family = family_for(config_dict.get("model_type"))
    architecture = architecture_for(family, type(model).__name__)
    reference = getattr(transformers, architecture).from_pretrained(folder, dtype=torch.float32).eval()
    multiple_choice = architecture.endswith("ForMultipleChoice")
    # The selfattn config counts the positions an input can take; RoBERTa's also counts the rows it reserves.
    inputs = sample_inputs(folder, reference.config, model.config.max_position_embeddings, texts, multiple_choice)
    with in_float32(model.eval()), torch.no_grad():  # outputs by name, whatever the configs' return_dict says
        expected = reference(**inputs, output_hidden_states=True, return_dict=True)
        actual = model(**inputs, output_hidden_states=True, return_dict=True)
    diffs = compare_outputs(expected, actual, inputs["attention_mask"])
    mask = inputs["attention_mask"].reshape(-1, inputs["attention_mask"].shape[-1]).unsqueeze(-1).float()
    pooled = [(last_hidden_state(out) * mask).sum(1) / mask.sum(1) for out in (expected, actual)]
    diffs["mean_pooled"] = max_abs_diff(*pooled)
    return diffs


SEQ2SEQ_STRATEGIES = {"greedy": {"num_beams": 1, "do_sample": False}, "beam": {"num_beams": 4, "do_sample": False}}


def verify_seq2seq(
    source: str | os.PathLike, model: torch.nn.Module, texts=SAMPLE_TEXTS, max_new_tokens: int = 16
) -> tuple[dict[str, float], dict[str, int]]:
    """Run the source transformers encoder-decoder and `model` on a padded batch of `texts`. Returns the max abs
    differences of the logits (teacher-forced on the source's greedy output) and of the encoder output, and, per
    decoding strategy (greedy, 4-beam search), how many sequences of the batch differ in their tokens."""
    import transformers

    folder = resolve_folder(source)
    family = family_for(read_config(folder).get("model_type"))
    architecture = architecture_for(family, type(model).__name__)
    reference = getattr(transformers, architecture).from_pretrained(folder, dtype=torch.float32).eval()
    try:
        inputs = sample_inputs(folder, reference.config, model.config.max_position_embeddings, texts)
    except ConversionError:
        raise
    except (ImportError, OSError, ValueError) as error:
        raise ConversionError(
            f"The tokenizer of {source} does not load ({type(error).__name__}: {error}); install what it needs "
            "(Marian tokenizers need `pip install sentencepiece`) to verify on sample text."
        ) from error
    with in_float32(model.eval()), torch.no_grad():
        tokens = {
            name: [m.generate(**inputs, **options, max_new_tokens=max_new_tokens) for m in (reference, model)]
            for name, options in SEQ2SEQ_STRATEGIES.items()
        }
        forced = dict(inputs, decoder_input_ids=tokens["greedy"][0], return_dict=True)
        expected, actual = reference(**forced), model(**forced)
    mismatches = {
        name: len(ours) if ours.shape != theirs.shape else int((ours != theirs).any(dim=1).sum())
        for name, (theirs, ours) in tokens.items()
    }
    # At padding the encoder outputs differ by definition (selfattn: the embedding output), and nothing reads them.
    real = inputs["attention_mask"].bool()
    diffs = {
        "logits": max_abs_diff(expected.logits, actual.logits),
        "encoder_last_hidden_state": max_abs_diff(
            expected.encoder_last_hidden_state[real], actual.encoder_last_hidden_state[real]
        ),
    }
    return diffs, mismatches


__all__ = [
    "ConversionError",
    "ConversionReport",
    "ENCODER_FAMILIES",
    "EXPORT_FAMILIES",
    "FAMILIES",
    "SEQ2SEQ_FAMILIES",
    "Family",
    "Head",
    "Rename",
    "Drop",
    "SourceField",
    "convert_checkpoint",
    "export_checkpoint",
    "load_checkpoint",
    "selfattn_config_kwargs",
    "sentence_transformers_files",
    "source_config_dict",
    "verify",
    "verify_seq2seq",
    "warm_start_encoder_decoder",
]
