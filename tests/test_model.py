"""Behaviour of the selfattn models on tiny random weights: attention back-ends agree, attention outputs are
real probabilities, padding changes nothing for real tokens, every head computes its loss and trains,
save/reload and resizing keep outputs and weight tying, bad inputs fail clearly.

Tolerances: fp32 comparisons between different computations of the same function use max abs diff <= 1e-5.
Weights (saved, reloaded, initialised, tied) must match exactly, and so must one model run twice on the same
tensors. The outputs of a reloaded or copied model match the original's to 1e-5, not bit for bit: MKL's fp32
GEMM does not promise identical rounding for separately allocated copies of the same weights on every CPU.
"""

import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from batch_helpers import assert_same_gradients, assert_same_weights, loss_and_gradients
from safetensors import safe_open
from transformers import Trainer, TrainingArguments
from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

from modeling_selfattn import (
    SelfAttnForCausalLM,
    SelfAttnForConditionalGeneration,
    SelfAttnForMaskedLM,
    SelfAttnForMultipleChoice,
    SelfAttnForQuestionAnswering,
    SelfAttnForSequenceClassification,
    SelfAttnForTokenClassification,
    SelfAttnModel,
)
from modeling_selfattn.model import SelfAttnEncoderLayer, shift_tokens_right

FP32_TOLERANCE = 1e-5
BATCH_SIZE = 2
SEQ_LENGTH = 7
TARGET_LENGTH = 5
NUM_CHOICES = 3
NUM_LABELS = 3
FIRST_ORDINARY_ID = 3  # ids below are pad / bos / eos


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


@dataclass(frozen=True)
class Head:
    """One model class on one config shape, with how to make its labels and the loss they should give."""

    model_class: type
    shape: str
    config_overrides: dict = field(default_factory=dict)
    make_labels: Callable | None = None  # (batch, config, generator) -> dict of label tensors
    reference_loss: Callable | None = None  # (output, labels) -> loss computed here from the logits

    @property
    def generates_tokens(self) -> bool:
        return self.model_class in (SelfAttnForMaskedLM, SelfAttnForConditionalGeneration, SelfAttnForCausalLM)

    @property
    def label_names(self) -> tuple[str, ...]:
        if self.model_class is SelfAttnForQuestionAnswering:
            return ("start_positions", "end_positions")
        return ("labels",)


def mask_padding(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return values.masked_fill(attention_mask == 0, -100)


def random_labels(generator: torch.Generator, high: int, *shape: int, low: int = 0) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=generator)


HEADS = {
    "model_encoder": Head(SelfAttnModel, "encoder"),
    "model_encoder_decoder": Head(SelfAttnModel, "encoder_decoder"),
    "model_decoder": Head(SelfAttnModel, "decoder"),
    "masked_lm": Head(
        SelfAttnForMaskedLM,
        "encoder",
        make_labels=lambda batch, config, generator: {
            # score every other token, as masked positions would be
            "labels": mask_padding(batch["input_ids"], batch["attention_mask"]).index_fill(
                1, torch.arange(0, SEQ_LENGTH, 2), -100
            )
        },
        reference_loss=lambda output, labels: cross_entropy(output.logits, labels["labels"]),
    ),
    "sequence_regression": Head(
        SelfAttnForSequenceClassification,
        "encoder",
        {"num_labels": 1, "problem_type": "regression"},
        make_labels=lambda batch, config, generator: {"labels": torch.randn(BATCH_SIZE, generator=generator)},
        reference_loss=lambda output, labels: F.mse_loss(output.logits.squeeze(-1), labels["labels"]),
    ),
    "sequence_single_label": Head(
        SelfAttnForSequenceClassification,
        "encoder",
        {"num_labels": NUM_LABELS, "problem_type": "single_label_classification"},
        make_labels=lambda batch, config, generator: {"labels": random_labels(generator, NUM_LABELS, BATCH_SIZE)},
        reference_loss=lambda output, labels: cross_entropy(output.logits, labels["labels"]),
    ),
    "sequence_multi_label": Head(
        SelfAttnForSequenceClassification,
        "encoder",
        {"num_labels": NUM_LABELS, "problem_type": "multi_label_classification"},
        make_labels=lambda batch, config, generator: {
            "labels": random_labels(generator, 2, BATCH_SIZE, NUM_LABELS).float()
        },
        reference_loss=lambda output, labels: F.binary_cross_entropy_with_logits(output.logits, labels["labels"]),
    ),
    "token_classification": Head(
        SelfAttnForTokenClassification,
        "encoder",
        {"num_labels": NUM_LABELS},
        make_labels=lambda batch, config, generator: {
            "labels": mask_padding(
                random_labels(generator, NUM_LABELS, BATCH_SIZE, SEQ_LENGTH), batch["attention_mask"]
            )
        },
        reference_loss=lambda output, labels: cross_entropy(output.logits, labels["labels"]),
    ),
    "question_answering": Head(
        SelfAttnForQuestionAnswering,
        "encoder",
        make_labels=lambda batch, config, generator: {
            "start_positions": random_labels(generator, SEQ_LENGTH // 2, BATCH_SIZE),
            "end_positions": random_labels(generator, SEQ_LENGTH - 2, BATCH_SIZE, low=SEQ_LENGTH // 2),
        },
        reference_loss=lambda output, labels: (
            cross_entropy(output.start_logits, labels["start_positions"])
            + cross_entropy(output.end_logits, labels["end_positions"])
        )
        / 2,
    ),
    "multiple_choice": Head(
        SelfAttnForMultipleChoice,
        "encoder",
        make_labels=lambda batch, config, generator: {"labels": random_labels(generator, NUM_CHOICES, BATCH_SIZE)},
        reference_loss=lambda output, labels: cross_entropy(output.logits, labels["labels"]),
    ),
    "conditional_generation": Head(
        SelfAttnForConditionalGeneration,
        "encoder_decoder",
        {"add_final_logits_bias": True},
        make_labels=lambda batch, config, generator: {
            "labels": random_labels(
                generator, config.vocab_size, BATCH_SIZE, TARGET_LENGTH, low=FIRST_ORDINARY_ID
            ).index_fill(1, torch.tensor([TARGET_LENGTH - 1]), -100)
        },
        # the labels are aligned with the logits: the shift happens on the decoder inputs
        reference_loss=lambda output, labels: cross_entropy(output.logits, labels["labels"]),
    ),
    "causal_lm": Head(
        SelfAttnForCausalLM,
        "decoder",
        make_labels=lambda batch, config, generator: {
            "labels": mask_padding(batch["input_ids"], batch["attention_mask"])
        },
        reference_loss=lambda output, labels: cross_entropy(output.logits[:, :-1], labels["labels"][:, 1:]),
    ),
}
HEADS_WITH_LOSS = [name for name, head in HEADS.items() if head.make_labels is not None]
LM_HEADS = [name for name, head in HEADS.items() if head.generates_tokens]
ENCODER_HEAD_CLASSES = sorted(
    {head.model_class for head in HEADS.values() if head.shape == "encoder" and head.model_class is not SelfAttnModel},
    key=lambda cls: cls.__name__,
)
SHAPES = ["encoder", "encoder_decoder", "decoder"]
# Config variants the shape-level tests run on besides the defaults: pre-LN with the paper's fixed sinusoidal
# positions and scaled embeddings; RoBERTa's padding-aware positions; ELECTRA's narrow embeddings.
CONFIG_VARIANTS = {
    "default": {},
    "pre_ln_sinusoidal": {
        "pre_layer_norm": True,
        "position_embedding_type": "sinusoidal",
        "scale_embedding": True,
        "embedding_layer_norm": False,
        "type_vocab_size": 0,
    },
    "padding_aware_positions": {"padding_aware_positions": True, "position_offset": 1},
    "narrow_embeddings": {"embedding_size": 16},
}


def right_padded_mask(shape: tuple[int, ...], num_padding: int) -> torch.Tensor:
    """All ones except the last `num_padding` tokens of the last sequence."""
    mask = torch.ones(shape, dtype=torch.long)
    mask.view(-1, shape[-1])[-1, shape[-1] - num_padding :] = 0
    return mask


def make_inputs(head_name: str, config, with_labels: bool = False) -> dict:
    """A batch of 2 sequences of 7 tokens (targets of 5), the last one right-padded. The seq2seq head always
    gets its labels: its decoder inputs are made from them."""
    head = HEADS[head_name]
    generator = torch.Generator().manual_seed(0)
    leading = (BATCH_SIZE, NUM_CHOICES) if head.model_class is SelfAttnForMultipleChoice else (BATCH_SIZE,)
    mask = right_padded_mask((*leading, SEQ_LENGTH), num_padding=2)
    input_ids = torch.randint(FIRST_ORDINARY_ID, config.vocab_size, mask.shape, generator=generator)
    batch = {"input_ids": input_ids.masked_fill(mask == 0, config.pad_token_id), "attention_mask": mask}
    if head.shape == "encoder" and config.type_vocab_size > 0:
        batch["token_type_ids"] = torch.randint(0, config.type_vocab_size, mask.shape, generator=generator)
    if head_name == "model_encoder_decoder":
        decoder_mask = right_padded_mask((BATCH_SIZE, TARGET_LENGTH), num_padding=1)
        decoder_ids = torch.randint(FIRST_ORDINARY_ID, config.vocab_size, decoder_mask.shape, generator=generator)
        batch["decoder_input_ids"] = decoder_ids.masked_fill(decoder_mask == 0, config.pad_token_id)
        batch["decoder_attention_mask"] = decoder_mask
    if head.make_labels is not None and (with_labels or head_name == "conditional_generation"):
        batch.update(head.make_labels(batch, config, generator))
    return batch


@pytest.fixture
def build_head(tiny_config_factory):
    """build_head(head_name, **config_overrides) -> (model in eval mode, config), seeded weights."""

    def build(head_name: str, **overrides):
        head = HEADS[head_name]
        config = tiny_config_factory(head.shape, **{**head.config_overrides, **overrides})
        torch.manual_seed(0)
        return head.model_class(config).eval(), config

    return build


def output_tensors(output) -> dict[str, torch.Tensor]:
    """Every tensor of a model output (tuples of tensors flattened), by field name."""
    tensors = {}
    for name, value in output.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif isinstance(value, tuple):
            tensors.update({f"{name}[{i}]": item for i, item in enumerate(value) if isinstance(item, torch.Tensor)})
    return tensors


def max_abs_diff(first, second) -> float:
    first, second = output_tensors(first), output_tensors(second)
    assert first.keys() == second.keys()
    return max((first[name].float() - second[name].float()).abs().max().item() for name in first)


def assert_outputs_close(first, second) -> None:
    first, second = output_tensors(first), output_tensors(second)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=FP32_TOLERANCE, msg=name)


def assert_same_weights_and_tables(model, reloaded) -> None:
    """Every saved tensor comes back bit for bit (assert_same_weights); tables rebuilt on load (not saved) are
    computed, so they are compared within the tolerance."""
    assert_same_weights(model, reloaded)
    original_state = model.state_dict()
    original_buffers, reloaded_buffers = dict(model.named_buffers()), dict(reloaded.named_buffers())
    assert original_buffers.keys() == reloaded_buffers.keys()
    for name in original_buffers.keys() - original_state.keys():
        torch.testing.assert_close(
            reloaded_buffers[name], original_buffers[name], rtol=0, atol=FP32_TOLERANCE, msg=name
        )


def test_the_config_shape_decides_which_stacks_exist(
    tiny_encoder_config, tiny_encoder_decoder_config, tiny_decoder_config
):
    encoder_only = SelfAttnModel(tiny_encoder_config)
    assert encoder_only.decoder is None and encoder_only.pooler is not None
    assert SelfAttnModel(tiny_encoder_config, add_pooling_layer=False).pooler is None
    encoder_decoder = SelfAttnModel(tiny_encoder_decoder_config)
    assert encoder_decoder.encoder is not None and encoder_decoder.pooler is None
    assert all(hasattr(layer, "cross_attn") for layer in encoder_decoder.decoder.layers)
    decoder_only = SelfAttnModel(tiny_decoder_config)
    assert decoder_only.encoder is None and decoder_only.pooler is None
    assert not any(hasattr(layer, "cross_attn") for layer in decoder_only.decoder.layers)
    configs = (tiny_encoder_config, tiny_encoder_decoder_config, tiny_decoder_config)
    assert [config.is_encoder_decoder for config in configs] == [False, True, False]


# --- attention implementations ---------------------------------------------------------------------------


def attention_implementation_available(implementation: str) -> bool:
    if implementation == "flex_attention":
        # flex attention is compiled; on CPU that needs a C++ compiler
        has_compiler = torch.cuda.is_available() or shutil.which("c++") is not None
        return is_torch_flex_attn_available() and has_compiler
    if implementation == "flash_attention_2":
        return is_flash_attn_2_available() and torch.cuda.is_available()
    return True


@pytest.mark.parametrize("variant", sorted(CONFIG_VARIANTS))
@pytest.mark.parametrize("head_name", ["model_encoder", "model_encoder_decoder", "model_decoder"])
def test_eager_and_sdpa_agree_with_padding(build_head, head_name, variant):
    model, _ = build_head(head_name, **CONFIG_VARIANTS[variant])
    batch = make_inputs(head_name, model.config)
    model.set_attn_implementation("eager")
    eager = model(**batch, use_cache=False)
    model.set_attn_implementation("sdpa")
    # every stack shares the switched config
    assert {module.config._attn_implementation for module in model.modules() if hasattr(module, "config")} == {"sdpa"}
    sdpa = model(**batch, use_cache=False)
    assert max_abs_diff(eager, sdpa) <= FP32_TOLERANCE


@pytest.mark.parametrize("implementation", ["flex_attention", "flash_attention_2"])
@pytest.mark.parametrize("head_name", ["model_encoder", "model_encoder_decoder", "model_decoder"])
def test_other_attention_implementations_agree_with_eager(build_head, head_name, implementation):
    if not attention_implementation_available(implementation):
        pytest.skip(f"{implementation} is not installed or has no device here")
    model, _ = build_head(head_name)
    batch = make_inputs(head_name, model.config)
    # flex attention has no backward on CPU
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(**batch, use_cache=False)
        model.set_attn_implementation(implementation)
        other = model(**batch, use_cache=False)
    assert max_abs_diff(eager, other) <= FP32_TOLERANCE


# --- attention probabilities and the hidden-state / attention stacks -------------------------------------


def assert_attention_probabilities(probabilities: torch.Tensor, key_mask: torch.Tensor, causal: bool) -> None:
    """Rows sum to 1 over the keys a query may see and are exactly 0 on the others."""
    assert (probabilities >= 0).all()
    query_length, key_length = probabilities.shape[-2:]
    visible = key_mask.bool()[:, None, None, :].expand(-1, 1, query_length, -1)
    if causal:
        visible = visible & torch.ones(query_length, key_length, dtype=torch.bool).tril()
    visible = visible.expand_as(probabilities)
    assert torch.equal(probabilities.masked_select(~visible), torch.zeros((~visible).sum().item()))
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(probabilities.shape[:-1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["default", "pre_ln_sinusoidal"])
@pytest.mark.parametrize("head_name", ["model_encoder", "model_encoder_decoder", "model_decoder"])
def test_attentions_are_probabilities_that_ignore_padding(build_head, head_name, variant):
    model, config = build_head(head_name, **CONFIG_VARIANTS[variant])
    model.set_attn_implementation("eager")
    batch = make_inputs(head_name, config)
    output = model(**batch, output_attentions=True, output_hidden_states=True, use_cache=False)
    source_mask = batch["attention_mask"]
    if head_name == "model_encoder_decoder":
        target_mask = batch["decoder_attention_mask"]
        checks = [
            (output.encoder_attentions, source_mask, False),
            (output.decoder_attentions, target_mask, True),
            (output.cross_attentions, source_mask, False),
        ]
        last_hidden_state, hidden_states = output.encoder_last_hidden_state, output.encoder_hidden_states
    else:
        checks = [(output.attentions, source_mask, head_name == "model_decoder")]
        last_hidden_state, hidden_states = output.last_hidden_state, output.hidden_states
    for attentions, key_mask, causal in checks:
        for probabilities in attentions:
            assert_attention_probabilities(probabilities, key_mask, causal)
    # the first hidden state is the embedding output, the last one the stack's output
    first_stack = model.encoder or model.decoder
    token_type_ids = batch.get("token_type_ids")
    torch.testing.assert_close(
        hidden_states[0], first_stack.embeddings(batch["input_ids"], token_type_ids=token_type_ids), rtol=0, atol=0
    )
    assert torch.equal(hidden_states[-1], last_hidden_state)


def expected_stacks(head_name: str, config, batch: dict) -> dict[str, tuple[int, tuple]]:
    """Output field -> (number of tensors, shape of each) for output_hidden_states/output_attentions."""
    source_ids = batch["input_ids"]
    num_sequences, source_length = source_ids.reshape(-1, source_ids.shape[-1]).shape
    hidden, heads = config.hidden_size, config.num_attention_heads
    if HEADS[head_name].shape == "encoder_decoder":
        target_length = batch["decoder_input_ids" if "decoder_input_ids" in batch else "labels"].shape[-1]
        encoder, decoder = config.encoder_layers, config.decoder_layers
        return {
            "encoder_hidden_states": (encoder + 1, (num_sequences, source_length, hidden)),
            "encoder_attentions": (encoder, (num_sequences, heads, source_length, source_length)),
            "decoder_hidden_states": (decoder + 1, (num_sequences, target_length, hidden)),
            "decoder_attentions": (decoder, (num_sequences, heads, target_length, target_length)),
            "cross_attentions": (decoder, (num_sequences, heads, target_length, source_length)),
        }
    return {
        "hidden_states": (config.num_hidden_layers + 1, (num_sequences, source_length, hidden)),
        "attentions": (config.num_hidden_layers, (num_sequences, heads, source_length, source_length)),
    }


@pytest.mark.parametrize("route", ["forward_arguments", "config"])
@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_hidden_states_and_attentions_have_one_entry_per_layer(build_head, head_name, route):
    # 3 decoder layers against 2 encoder layers, so that the two stacks cannot be confused
    overrides = {"decoder_layers": 3} if HEADS[head_name].shape == "encoder_decoder" else {}
    model, config = build_head(head_name, **overrides)
    model.set_attn_implementation("eager")
    batch = make_inputs(head_name, config)
    if route == "config":
        config.output_hidden_states = config.output_attentions = True
        output = model(**batch)
    else:
        output = model(**batch, output_hidden_states=True, output_attentions=True)
    for name, (count, shape) in expected_stacks(head_name, config, batch).items():
        stack = getattr(output, name)
        assert len(stack) == count, name
        assert all(tuple(tensor.shape) == shape for tensor in stack), name

    # and none of them by default
    config.output_hidden_states = config.output_attentions = False
    plain = model(**batch)
    assert all(getattr(plain, name) is None for name in expected_stacks(head_name, config, batch))


@pytest.mark.parametrize("route", ["forward_arguments", "config"])
@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_return_dict_false_gives_the_same_values_as_a_tuple(build_head, head_name, route):
    model, config = build_head(head_name)
    batch = make_inputs(head_name, config, with_labels=True)
    expected = model(**batch, output_hidden_states=True).to_tuple()
    if route == "config":
        config.return_dict = False
        result = model(**batch, output_hidden_states=True)
    else:
        result = model(**batch, output_hidden_states=True, return_dict=False)
    assert type(result) is tuple and len(result) == len(expected)
    for got, want in zip(result, expected):
        if isinstance(want, torch.Tensor):
            assert torch.equal(got, want)
        elif isinstance(want, tuple):
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_hidden_states_and_attentions_keep_their_gradients(build_head):
    model, config = build_head("model_encoder")
    model.set_attn_implementation("eager")
    output = model(**make_inputs("model_encoder", config), output_hidden_states=True, output_attentions=True)
    first_hidden_states, first_attentions = output.hidden_states[0], output.attentions[0]
    first_hidden_states.retain_grad()
    first_attentions.retain_grad()
    output.last_hidden_state.sum().backward()
    assert first_hidden_states.grad is not None and first_hidden_states.grad.abs().sum() > 0
    assert first_attentions.grad is not None and first_attentions.grad.abs().sum() > 0


# --- padding ---------------------------------------------------------------------------------------------


def pad_first_sequence(sequences: torch.Tensor, real_length: int, side: str, pad_token_id: int) -> dict:
    """Keep `real_length` tokens of the first sequence, padded on `side` to the batch length; return the padded
    ids, the mask and the slice of the first row that holds the real tokens."""
    mask = torch.ones_like(sequences)
    real = slice(0, real_length) if side == "right" else slice(sequences.shape[1] - real_length, None)
    mask[0] = 0
    mask[0, real] = 1
    return {"ids": sequences.masked_fill(mask == 0, pad_token_id), "mask": mask, "real": real}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(
    ("variant", "padding_side"),
    [
        ("default", "right"),
        ("pre_ln_sinusoidal", "right"),
        ("padding_aware_positions", "right"),
        # left padding keeps positions only when they are counted over real tokens
        ("padding_aware_positions", "left"),
    ],
)
@pytest.mark.parametrize("shape", SHAPES)
def test_padding_does_not_change_real_token_outputs(build_head, shape, variant, padding_side, attn_implementation):
    """The same sentence alone and padded in a batch with a longer one gives the same outputs at its real
    tokens (encoder, decoder, and the decoder reading a padded encoder output)."""
    head_name = f"model_{shape}"
    model, config = build_head(head_name, **CONFIG_VARIANTS[variant])
    model.set_attn_implementation(attn_implementation)
    generator = torch.Generator().manual_seed(1)
    sources = torch.randint(FIRST_ORDINARY_ID, config.vocab_size, (2, 9), generator=generator)
    targets = torch.randint(FIRST_ORDINARY_ID, config.vocab_size, (2, 6), generator=generator)
    source = pad_first_sequence(sources, 5, padding_side, config.pad_token_id)
    padded = {"input_ids": source["ids"], "attention_mask": source["mask"]}
    alone = {"input_ids": source["ids"][:1, source["real"]]}
    output_real = source["real"]
    if shape == "encoder_decoder":
        target = pad_first_sequence(targets, 4, padding_side, config.pad_token_id)
        padded.update(decoder_input_ids=target["ids"], decoder_attention_mask=target["mask"])
        alone["decoder_input_ids"] = target["ids"][:1, target["real"]]
        output_real = target["real"]
    batch_output, alone_output = model(**padded, use_cache=False), model(**alone, use_cache=False)
    torch.testing.assert_close(
        batch_output.last_hidden_state[:1, output_real], alone_output.last_hidden_state, rtol=0, atol=FP32_TOLERANCE
    )
    if shape == "encoder_decoder":
        torch.testing.assert_close(
            batch_output.encoder_last_hidden_state[:1, source["real"]],
            alone_output.encoder_last_hidden_state,
            rtol=0,
            atol=FP32_TOLERANCE,
        )


# --- gradient checkpointing ------------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("head_name", ["masked_lm", "conditional_generation", "causal_lm"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(build_head, head_name, use_reentrant):
    model, config = build_head(head_name)
    model.train()  # checkpointing only acts in training; dropout is 0 in the tiny config
    batch = make_inputs(head_name, config, with_labels=True)
    # Checkpointing wraps each layer's forward, so the recompute shows as a second call of its sub-modules.
    layer_calls = []
    for module in model.modules():
        if isinstance(module, SelfAttnEncoderLayer):  # decoder layers included
            module.ffn.register_forward_hook(lambda *args: layer_calls.append(1))
    outputs, gradients = loss_and_gradients(model, batch)
    calls_without = len(layer_calls)

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.is_gradient_checkpointing
    layer_calls.clear()
    checkpointed, checkpointed_gradients = loss_and_gradients(model, batch)
    # every layer ran again during backward: checkpointing really happened
    assert len(layer_calls) == 2 * calls_without
    torch.testing.assert_close(checkpointed.loss, outputs.loss, rtol=0, atol=1e-6)
    assert_same_gradients(gradients, checkpointed_gradients, atol=1e-6)


@pytest.mark.parametrize("head_name", ["masked_lm", "conditional_generation", "causal_lm"])
def test_chunk_size_feed_forward_takes_positions_a_chunk_at_a_time(build_head, head_name):
    """transformers' config.chunk_size_feed_forward, as BERT reads it: every feed-forward takes that many positions of
    each sequence at a time (3 of 7 positions: chunks of 3, 3 and 1), with the loss and gradients of one call; and
    one call again under torch.jit.trace, which would keep the traced input's chunks."""
    model, config = build_head(head_name)
    chunked, _ = build_head(head_name, chunk_size_feed_forward=3)
    assert_same_weights(model, chunked)
    batch = make_inputs(head_name, config, with_labels=True)
    rows_seen = {model: [], chunked: []}
    for owner in (model, chunked):
        for module in owner.modules():
            if isinstance(module, SelfAttnEncoderLayer):  # decoder layers included
                module.ffn.fc1.register_forward_pre_hook(
                    lambda module, args, seen=rows_seen[owner]: seen.append(args[0].shape[:-1].numel())
                )
    outputs, gradients = loss_and_gradients(model, batch)
    chunked_outputs, chunked_gradients = loss_and_gradients(chunked, batch)
    # the same rows, at most 3 positions of the 2 sequences a call
    assert sum(rows_seen[chunked]) == sum(rows_seen[model])
    assert max(rows_seen[chunked]) == 3 * BATCH_SIZE < min(rows_seen[model])
    torch.testing.assert_close(chunked_outputs.loss, outputs.loss, rtol=0, atol=FP32_TOLERANCE)
    torch.testing.assert_close(chunked_outputs.logits, outputs.logits, rtol=0, atol=FP32_TOLERANCE)
    assert_same_gradients(gradients, chunked_gradients, atol=FP32_TOLERANCE)

    ffn = next(module.ffn for module in chunked.modules() if isinstance(module, SelfAttnEncoderLayer))
    rows_seen[chunked].clear()
    with torch.no_grad():
        traced = torch.jit.trace(ffn, torch.randn(2, 7, config.hidden_size), check_trace=False)
        assert rows_seen[chunked] == [14]
        longer = torch.randn(2, 11, config.hidden_size)
        torch.testing.assert_close(traced(longer), ffn(longer), rtol=0, atol=FP32_TOLERANCE)


def test_chunk_size_feed_forward_of_zero_or_less_and_beyond_the_sequence_takes_one_call(build_head):
    """As BERT: chunks only for a positive chunk_size_feed_forward; a chunk as long as the sequence is one call."""
    for chunk_size in (-1, 0, 7, 50):
        model, config = build_head("masked_lm", chunk_size_feed_forward=chunk_size)
        batch = make_inputs("masked_lm", config)
        calls = []
        model.model.encoder.layers[0].ffn.fc1.register_forward_pre_hook(lambda module, args: calls.append(1))
        with torch.no_grad():
            model(**batch)
        assert calls == [1], chunk_size


def test_chunk_size_feed_forward_on_an_unpadded_batch_takes_that_many_tokens_at_a_time(build_head):
    """A batch the encoder unpads (a quarter of it padding) is one row of packed tokens: chunks of chunk_size tokens,
    with the outputs of one call."""
    model, config = build_head("model_encoder")
    chunked, _ = build_head("model_encoder", chunk_size_feed_forward=4)
    input_ids = torch.randint(FIRST_ORDINARY_ID, config.vocab_size, (4, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1:, 6:] = 0  # 30 real tokens of 48
    rows_seen = []
    chunked.encoder.layers[0].ffn.fc1.register_forward_pre_hook(
        lambda module, args: rows_seen.append(args[0].shape[:-1].numel())
    )
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        actual = chunked(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    assert rows_seen == [4] * 7 + [2]
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=0, atol=FP32_TOLERANCE)


# --- losses and training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("head_name", HEADS_WITH_LOSS)
def test_loss_from_labels_matches_the_reference_and_reaches_every_weight(build_head, head_name):
    model, config = build_head(head_name)
    batch = make_inputs(head_name, config, with_labels=True)
    labels = {name: batch[name] for name in HEADS[head_name].label_names}
    output = model(**batch)
    assert output.loss.dim() == 0 and torch.isfinite(output.loss)
    torch.testing.assert_close(output.loss, HEADS[head_name].reference_loss(output, labels), rtol=0, atol=1e-6)
    output.loss.backward()
    without_gradient = [name for name, param in model.named_parameters() if param.grad is None]
    assert not without_gradient, f"parameters the loss does not reach: {without_gradient}"


def test_conditional_generation_decoder_inputs_are_the_labels_shifted_right(build_head):
    model, config = build_head("conditional_generation")
    batch = make_inputs("conditional_generation", config)
    labels = batch["labels"]
    labels[0, 1] = -100  # an unscored token inside the target
    decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    assert (decoder_input_ids[:, 0] == config.decoder_start_token_id).all()
    assert torch.equal(decoder_input_ids[:, 1:], labels[:, :-1].masked_fill(labels[:, :-1] == -100, config.pad_token_id))
    from_labels = model(**batch)
    explicit = model(**batch, decoder_input_ids=decoder_input_ids)
    # the ids are checked exactly above; the two forwards run on separately made id tensors
    torch.testing.assert_close(from_labels.logits, explicit.logits, rtol=0, atol=FP32_TOLERANCE)


@pytest.mark.parametrize("head_name", HEADS_WITH_LOSS)
def test_one_trainer_step_runs(build_head, head_name, tmp_path):
    model, config = build_head(head_name)
    batch = make_inputs(head_name, config, with_labels=True)
    dataset = [{name: values[i] for name, values in batch.items()} for i in range(BATCH_SIZE)]
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset)
    result = trainer.train()
    assert trainer.state.global_step == 1
    assert math.isfinite(result.training_loss) and result.training_loss > 0
    changed = [name for name, param in model.named_parameters() if not torch.equal(param, before[name])]
    assert changed, "the optimizer step changed no weight"


@pytest.mark.parametrize("head_name", HEADS_WITH_LOSS)
def test_loss_decreases_on_a_fixed_batch(build_head, head_name):
    model, config = build_head(head_name)
    model.train()
    batch = make_inputs(head_name, config, with_labels=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0], losses


# --- save / reload -----------------------------------------------------------------------------------------


def save_and_reload(model, directory):
    model.save_pretrained(directory)
    assert (directory / "model.safetensors").is_file()
    reloaded, loading_info = type(model).from_pretrained(directory, output_loading_info=True)
    return reloaded.eval(), loading_info


@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_save_and_reload_gives_the_same_weights_and_outputs(build_head, head_name, tmp_path):
    model, config = build_head(head_name)
    batch = make_inputs(head_name, config, with_labels=True)
    reloaded, loading_info = save_and_reload(model, tmp_path)
    assert not any(loading_info.values()), loading_info  # no missing, unexpected or mismatched keys
    assert_same_weights_and_tables(model, reloaded)
    assert_outputs_close(model(**batch), reloaded(**batch))
    original_state = model.state_dict()
    # tied weights are stored once, under one of their names
    with safe_open(tmp_path / "model.safetensors", framework="pt") as saved:
        saved_names = set(saved.keys())
    storage = {name: tensor.data_ptr() for name, tensor in original_state.items()}
    assert saved_names <= storage.keys()
    assert {storage[name] for name in saved_names} == set(storage.values())
    assert len(saved_names) == len(set(storage.values()))


@pytest.mark.parametrize("variant", ["pre_ln_sinusoidal", "padding_aware_positions", "narrow_embeddings"])
@pytest.mark.parametrize("shape", SHAPES)
def test_save_and_reload_keeps_config_variants(build_head, shape, variant, tmp_path):
    # the sinusoidal table is a non-persistent buffer: it must be rebuilt on load, not left uninitialised
    model, config = build_head(f"model_{shape}", **CONFIG_VARIANTS[variant])
    batch = make_inputs(f"model_{shape}", config)
    reloaded, loading_info = save_and_reload(model, tmp_path)
    assert not any(loading_info.values()), loading_info
    assert_same_weights_and_tables(model, reloaded)
    assert_outputs_close(model(**batch, use_cache=False), reloaded(**batch, use_cache=False))


def test_base_weights_load_into_a_head_and_back(build_head, tmp_path):
    base, config = build_head("model_encoder")
    base.save_pretrained(tmp_path / "base")
    classifier, info = SelfAttnForSequenceClassification.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"]
    # the new head is initialised as configured, not left as uninitialised memory
    assert torch.equal(classifier.classifier.bias, torch.zeros_like(classifier.classifier.bias))
    assert 0.5 < classifier.classifier.weight.std().item() / config.initializer_range < 2
    assert all(torch.equal(value, classifier.model.state_dict()[name]) for name, value in base.state_dict().items())

    masked_lm, _ = build_head("masked_lm")
    masked_lm.save_pretrained(tmp_path / "masked_lm")
    encoder, info = SelfAttnModel.from_pretrained(tmp_path / "masked_lm", output_loading_info=True)
    assert all(key.startswith("lm_head.") for key in info["unexpected_keys"]) and info["unexpected_keys"]
    assert all(key.startswith("pooler.") for key in info["missing_keys"])  # the MLM has no pooler
    assert all(
        torch.equal(value, encoder.state_dict()[name])
        for name, value in masked_lm.model.state_dict().items()
    )


def test_classifier_with_another_label_count_loads_only_with_ignore_mismatched_sizes(build_head, tmp_path):
    model, config = build_head("sequence_single_label")
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        SelfAttnForSequenceClassification.from_pretrained(tmp_path, num_labels=NUM_LABELS + 2)
    reloaded, info = SelfAttnForSequenceClassification.from_pretrained(
        tmp_path, num_labels=NUM_LABELS + 2, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert {key for key, *_ in info["mismatched_keys"]} == {"classifier.weight", "classifier.bias"}
    assert not info["missing_keys"] and not info["unexpected_keys"]
    batch = make_inputs("sequence_single_label", config)
    assert reloaded(**batch).logits.shape == (BATCH_SIZE, NUM_LABELS + 2)


@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_weights_are_initialised_from_the_config(build_head, head_name):
    initializer_range = 0.2  # far from PyTorch's own defaults, so that a module left to them shows
    model, config = build_head(head_name, initializer_range=initializer_range)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            assert 0.5 < module.weight.std().item() / initializer_range < 2, name
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
            assert torch.equal(module.weight[module.padding_idx], torch.zeros(module.embedding_dim)), name
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
    if getattr(model, "final_logits_bias", None) is not None:
        assert torch.equal(model.final_logits_bias, torch.zeros_like(model.final_logits_bias))


@pytest.mark.parametrize("shape", SHAPES)
def test_set_input_embeddings_replaces_the_table_of_every_stack(build_head, shape):
    model, config = build_head(f"model_{shape}")
    batch = make_inputs(f"model_{shape}", config)
    before = model(**batch, use_cache=False).last_hidden_state
    replacement = torch.nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement
    for stack in (model.encoder, model.decoder):
        assert stack is None or stack.embeddings.word_embeddings is replacement
    assert not torch.allclose(model(**batch, use_cache=False).last_hidden_state, before)


# --- weight tying and resizing -----------------------------------------------------------------------------


def assert_lm_head_tied(model) -> None:
    """The output projection is the input embedding table: same storage, and an edit to one shows in the other."""
    embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
    assert output.weight.data_ptr() == embeddings.weight.data_ptr()
    assert output.weight.shape == embeddings.weight.shape
    with torch.no_grad():
        embeddings.weight[FIRST_ORDINARY_ID] += 1.0
    assert torch.equal(output.weight[FIRST_ORDINARY_ID], embeddings.weight[FIRST_ORDINARY_ID])
    if model.config.is_encoder_decoder:
        assert model.model.decoder.embeddings.word_embeddings.weight.data_ptr() == embeddings.weight.data_ptr()


def assert_vocabulary_size(model, vocab_size: int) -> None:
    assert model.config.vocab_size == vocab_size
    assert model.get_input_embeddings().num_embeddings == vocab_size
    output = model.get_output_embeddings()
    if output is not None:
        assert output.out_features == vocab_size
        if output.bias is not None:
            assert output.bias.shape == (vocab_size,)
    if getattr(model, "final_logits_bias", None) is not None:
        assert model.final_logits_bias.shape == (1, vocab_size)


@pytest.mark.parametrize("lm_head_transform", [False, True], ids=["projection", "mlm_head"])
@pytest.mark.parametrize("head_name", LM_HEADS)
def test_lm_head_stays_tied_through_resizing_and_reloading(build_head, head_name, lm_head_transform, tmp_path):
    model, config = build_head(head_name, lm_head_transform=lm_head_transform)
    assert_lm_head_tied(model)
    sizes = (config.vocab_size + 13, config.vocab_size - 9)  # resizing updates config.vocab_size
    for new_size in sizes:
        model.resize_token_embeddings(new_size)
        assert_vocabulary_size(model, new_size)
        assert_lm_head_tied(model)
    reloaded, loading_info = save_and_reload(model, tmp_path)
    assert not any(loading_info.values()), loading_info
    assert_vocabulary_size(reloaded, sizes[-1])
    assert_lm_head_tied(reloaded)


@pytest.mark.parametrize("lm_head_transform", [False, True], ids=["projection", "mlm_head"])
@pytest.mark.parametrize("head_name", LM_HEADS)
def test_untied_lm_head_stays_separate(build_head, head_name, lm_head_transform, tmp_path):
    model, _ = build_head(head_name, tie_word_embeddings=False, lm_head_transform=lm_head_transform)
    embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
    assert output.weight.data_ptr() != embeddings.weight.data_ptr()
    assert not torch.equal(output.weight, embeddings.weight)
    reloaded, loading_info = save_and_reload(model, tmp_path)
    assert not any(loading_info.values()), loading_info
    assert torch.equal(reloaded.get_output_embeddings().weight, output.weight)
    assert torch.equal(reloaded.get_input_embeddings().weight, embeddings.weight)
    assert reloaded.get_output_embeddings().weight.data_ptr() != reloaded.get_input_embeddings().weight.data_ptr()
    # resizing resizes both, and keeps them apart
    reloaded.resize_token_embeddings(reloaded.config.vocab_size + 5)
    assert_vocabulary_size(reloaded, model.config.vocab_size + 5)
    assert reloaded.get_output_embeddings().weight.data_ptr() != reloaded.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("change", [13, -9], ids=["bigger", "smaller"])
@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_resize_token_embeddings_keeps_output_shapes(build_head, head_name, change):
    model, config = build_head(head_name)
    old_size = config.vocab_size
    before = output_tensors(model(**make_inputs(head_name, config)))
    kept_rows = model.get_input_embeddings().weight[: min(old_size, old_size + change)].detach().clone()
    model.resize_token_embeddings(old_size + change)
    assert_vocabulary_size(model, old_size + change)
    assert torch.equal(model.get_input_embeddings().weight[: kept_rows.shape[0]], kept_rows)
    batch = make_inputs(head_name, config)  # ids drawn below the new vocabulary size
    batch["input_ids"].view(-1)[0] = config.vocab_size - 1
    after = output_tensors(model(**batch))
    for name, tensor in before.items():
        expected = list(tensor.shape)
        if HEADS[head_name].generates_tokens and name == "logits":
            expected[-1] = old_size + change
        assert list(after[name].shape) == expected, name
    batch["input_ids"].view(-1)[0] = config.vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(**batch)


@pytest.mark.parametrize(
    ("field", "value"),
    [("pad_token_id", 60), ("bos_token_id", 60), ("eos_token_id", [2, 60]), ("decoder_start_token_id", 60)],
)
def test_resizing_below_a_special_token_id_is_refused_before_any_change(tiny_config_factory, field, value, tmp_path):
    """A config naming an id outside the table does not load again (SelfAttnConfig refuses such a pad_token_id;
    transformers warns of the others), and generation would look up tokens that no longer exist."""
    model = SelfAttnForCausalLM(tiny_config_factory("decoder", **{field: value}))
    table = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(
        ValueError,
        match=rf"resize_token_embeddings\(new_num_tokens=50\) keeps token ids 0\.\.49, but the config names ids "
        rf"beyond them: \{{'{field}': {re.escape(str(value))}\}}\. Pass new_num_tokens >= 61",
    ):
        model.resize_token_embeddings(50)
    assert model.config.vocab_size == table.shape[0] and torch.equal(model.get_input_embeddings().weight, table)
    # pad_to_multiple_of rounds the size up past the id, as transformers does: accepted, and the model reloads.
    model.resize_token_embeddings(50, pad_to_multiple_of=64)
    reloaded, _ = save_and_reload(model, tmp_path)
    assert_vocabulary_size(reloaded, 64)


@pytest.mark.parametrize("head_name", LM_HEADS)
def test_resizing_an_int8_lm_head_is_refused_before_any_change(build_head, head_name):
    """transformers' resizing reads the LM head's weight as a tensor, which an int8 layer's is not: it failed with an
    AttributeError after replacing the token table, leaving config.vocab_size and the LM head as they were."""
    model, config = build_head(head_name)
    model.quantize("int8")
    table, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = table.weight.detach().clone()
    batch = make_inputs(head_name, config)
    with torch.no_grad():
        before = output_tensors(model(**batch))
    with pytest.raises(
        RuntimeError,
        match=r"resize_token_embeddings\(new_num_tokens=120\): the LM head of SelfAttnFor\w+ \((lm_head|lm_head\."
        r"decoder)\) is an int8 layer .*nothing was changed\. Resize the float32 model before quantizing",
    ):
        model.resize_token_embeddings(120)
    assert model.get_input_embeddings() is table and torch.equal(table.weight, rows)
    assert model.get_output_embeddings() is lm_head and model.config.vocab_size == config.vocab_size == rows.shape[0]
    with torch.no_grad():
        after = output_tensors(model(**batch))
    assert before.keys() == after.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


# --- inputs_embeds -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["default", "pre_ln_sinusoidal", "narrow_embeddings"])
@pytest.mark.parametrize("shape", SHAPES)
def test_inputs_embeds_give_the_same_result_as_input_ids(build_head, shape, variant):
    head_name = f"model_{shape}"
    model, config = build_head(head_name, **CONFIG_VARIANTS[variant])
    batch = make_inputs(head_name, config)
    from_ids = model(**batch, use_cache=False)
    embed = model.get_input_embeddings()
    batch["inputs_embeds"] = embed(batch.pop("input_ids"))
    if "decoder_input_ids" in batch:
        batch["decoder_inputs_embeds"] = embed(batch.pop("decoder_input_ids"))
    from_embeds = model(**batch, use_cache=False)
    assert max_abs_diff(from_ids, from_embeds) <= FP32_TOLERANCE


# --- bad inputs ------------------------------------------------------------------------------------------------


def replace(name: str, make_value: Callable) -> Callable:
    """An edit of a good batch: set `name` to make_value(batch, config), or drop it when that returns None."""

    def edit(batch: dict, config) -> dict:
        value = make_value(batch, config)
        return {key: item for key, item in {**batch, name: value}.items() if item is not None}

    return edit


def too_long(config):
    return torch.full((1, config.max_position_embeddings + 1), FIRST_ORDINARY_ID)


TOO_LONG_MESSAGE = "has positions for .* Truncate the input"
BAD_INPUTS = {
    "encoder_sequence_too_long": ("model_encoder", lambda b, c: {"input_ids": too_long(c)}, TOO_LONG_MESSAGE),
    "decoder_sequence_too_long": ("causal_lm", lambda b, c: {"input_ids": too_long(c)}, TOO_LONG_MESSAGE),
    "target_sequence_too_long": (
        "model_encoder_decoder",
        lambda b, c: {"input_ids": b["input_ids"][:1], "decoder_input_ids": too_long(c)},
        TOO_LONG_MESSAGE,
    ),
    "id_equal_to_vocab_size": (
        "masked_lm",
        replace("input_ids", lambda b, c: b["input_ids"] + c.vocab_size),
        "outside the vocabulary",
    ),
    "negative_id": ("model_encoder", replace("input_ids", lambda b, c: -b["input_ids"]), "outside the vocabulary"),
    "decoder_id_out_of_range": (
        "model_encoder_decoder",
        replace("decoder_input_ids", lambda b, c: b["decoder_input_ids"] + c.vocab_size),
        "outside the vocabulary",
    ),
    "causal_lm_id_out_of_range": (
        "causal_lm",
        replace("input_ids", lambda b, c: b["input_ids"] + c.vocab_size),
        "resize_token_embeddings",
    ),
    "attention_mask_too_long": (
        "model_encoder",
        replace("attention_mask", lambda b, c: torch.ones(BATCH_SIZE, SEQ_LENGTH + 1, dtype=torch.long)),
        "attention_mask has shape",
    ),
    "attention_mask_wrong_batch": (
        "causal_lm",
        replace("attention_mask", lambda b, c: torch.ones(BATCH_SIZE + 1, SEQ_LENGTH, dtype=torch.long)),
        "attention_mask has shape",
    ),
    "decoder_attention_mask_wrong_shape": (
        "model_encoder_decoder",
        replace("decoder_attention_mask", lambda b, c: torch.ones(BATCH_SIZE, SEQ_LENGTH, dtype=torch.long)),
        "attention_mask has shape",
    ),
    "encoder_ids_and_embeds": (
        "model_encoder",
        replace("inputs_embeds", lambda b, c: torch.zeros(BATCH_SIZE, SEQ_LENGTH, c.hidden_size)),
        "exactly one of input_ids or inputs_embeds",
    ),
    "encoder_neither_ids_nor_embeds": ("sequence_single_label", replace("input_ids", lambda b, c: None), "exactly one"),
    "decoder_ids_and_embeds": (
        "model_decoder",
        replace("inputs_embeds", lambda b, c: torch.zeros(BATCH_SIZE, SEQ_LENGTH, c.hidden_size)),
        "exactly one of input_ids or inputs_embeds",
    ),
    "encoder_decoder_without_decoder_inputs": (
        "model_encoder_decoder",
        replace("decoder_input_ids", lambda b, c: None),
        "decoder_input_ids",
    ),
    "conditional_generation_without_decoder_inputs_or_labels": (
        "conditional_generation",
        replace("labels", lambda b, c: None),
        "labels",
    ),
    "decoder_only_model_without_inputs": ("model_decoder", lambda b, c: {}, "input_ids or inputs_embeds"),
    "causal_lm_without_inputs": ("causal_lm", lambda b, c: {}, "input_ids or inputs_embeds"),
    "multiple_choice_without_choice_dimension": (
        "multiple_choice",
        lambda b, c: {"input_ids": b["input_ids"][:, 0], "attention_mask": b["attention_mask"][:, 0]},
        "num_choices",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_a_clear_error(build_head, case):
    head_name, edit, message = BAD_INPUTS[case]
    model, config = build_head(head_name)
    with pytest.raises(ValueError, match=message):
        model(**edit(make_inputs(head_name, config), config))


@pytest.mark.parametrize(
    ("model_class", "shape", "message"),
    [(cls, shape, "encoder head") for cls in ENCODER_HEAD_CLASSES for shape in ("encoder_decoder", "decoder")]
    + [
        (SelfAttnForConditionalGeneration, "encoder", "needs encoder_layers > 0 and decoder_layers > 0"),
        (SelfAttnForConditionalGeneration, "decoder", "needs encoder_layers > 0 and decoder_layers > 0"),
        (SelfAttnForCausalLM, "encoder", "decoder-only"),
        (SelfAttnForCausalLM, "encoder_decoder", "decoder-only"),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else value if len(value) < 20 else None,
)
def test_heads_refuse_configs_of_another_shape(tiny_config_factory, model_class, shape, message):
    with pytest.raises(ValueError, match=message):
        model_class(tiny_config_factory(shape))


# --- what transformers' common model tests also check ------------------------------------------------------


@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_num_parameters_counts_tied_weights_once(build_head, head_name):
    model, _ = build_head(head_name)
    unique = {param.data_ptr(): param.numel() for param in model.parameters()}
    assert model.num_parameters() == sum(unique.values())
    embedding_tables = {
        module.weight.data_ptr(): module.weight.numel()
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding)
    }
    # tied LM output projections count as embeddings too
    assert model.num_parameters(exclude_embeddings=True) == sum(unique.values()) - sum(embedding_tables.values())
    if head_name == "masked_lm":
        base = model.model.num_parameters()
        lm_head_own = sum(param.numel() for name, param in model.lm_head.named_parameters() if name != "decoder.weight")
        assert model.num_parameters() == base + lm_head_own


@pytest.mark.parametrize("head_name", ["model_encoder", "model_encoder_decoder", "causal_lm"])
def test_bfloat16_forward_and_loading(build_head, head_name, tmp_path):
    model, config = build_head(head_name)
    batch = make_inputs(head_name, config)
    reference = output_tensors(model(**batch, use_cache=False))
    model.save_pretrained(tmp_path)

    model.to(torch.bfloat16)
    half = output_tensors(model(**batch, use_cache=False))
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {param.dtype for param in loaded.parameters()} == {torch.bfloat16}
    assert_same_weights_and_tables(model, loaded)  # loading in bf16 rounds the weights as casting does
    loaded_half = output_tensors(loaded(**batch, use_cache=False))
    for name, tensor in half.items():
        assert tensor.dtype == torch.bfloat16 and torch.isfinite(tensor).all(), name
        # separately allocated bf16 weights may take another GEMM path: a few bf16 rounding steps (1/128 at
        # |x| near 1) apart after two layers, the bound the CUDA tests use for bf16
        torch.testing.assert_close(loaded_half[name], tensor, rtol=0, atol=3e-2, msg=name)
        # bf16 keeps ~3 significant digits; the tiny model's activations are O(1)
        torch.testing.assert_close(tensor.float(), reference[name], rtol=0, atol=0.1, msg=name)


def test_eval_is_deterministic_and_train_applies_dropout(build_head):
    model, config = build_head("masked_lm", hidden_dropout_prob=0.3, attention_dropout=0.3)
    batch = make_inputs("masked_lm", config)
    assert torch.equal(model(**batch).logits, model(**batch).logits)
    model.train()
    assert not torch.equal(model(**batch).logits, model(**batch).logits)



# --- the first token alone in the last layer ----------------------------------------------------------------------

FIRST_TOKEN_HEADS = ["sequence_single_label", "sequence_regression", "multiple_choice"]


def last_layer_rows(model) -> list[int]:
    """Calls on the model's run the last encoder layer's FFN with how many rows per sequence (a recording hook)."""
    rows = []
    last_layer = model.model.encoder.layers[-1]
    last_layer.ffn.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[1]))
    return rows


@pytest.mark.parametrize("variant", ["default", "pre_ln_sinusoidal"])
@pytest.mark.parametrize("padding", ["right", "left", "heavy"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa", "flex_attention", "flash_attention_2"])
def test_first_token_only_is_the_first_row_of_the_full_output(build_head, variant, padding, attn_implementation):
    """SelfAttnModel(first_token_only=True) equals the full computation at the first position: light padding on
    either side (the padded path; a left-padded first token keeps the embedding output) and heavy padding (the
    unpadded path, which computes every position and keeps the first); flex's block masks and flash's 2-D masks
    compute every position too."""
    if not attention_implementation_available(attn_implementation):
        pytest.skip(f"{attn_implementation} is not available here")
    model, config = build_head("model_encoder", attn_implementation=attn_implementation, **CONFIG_VARIANTS[variant])
    batch = make_inputs("model_encoder", config)
    if padding == "left":
        batch["attention_mask"] = batch["attention_mask"].flip(-1)
    elif padding == "heavy":
        batch["attention_mask"] = torch.tensor([[1] * SEQ_LENGTH, [1] * 2 + [0] * (SEQ_LENGTH - 2)])
    with torch.no_grad():
        full = model(**batch)
        first = model(**batch, first_token_only=True)
    assert first.last_hidden_state.shape == (BATCH_SIZE, 1, config.hidden_size)
    torch.testing.assert_close(first.last_hidden_state, full.last_hidden_state[:, :1], rtol=0, atol=FP32_TOLERANCE)
    torch.testing.assert_close(first.pooler_output, full.pooler_output, rtol=0, atol=FP32_TOLERANCE)


@pytest.mark.parametrize("head_name", FIRST_TOKEN_HEADS)
def test_first_token_heads_run_the_last_layer_on_one_row_with_the_same_loss_and_gradients(build_head, head_name):
    """The sequence and multiple-choice classifiers read the first token alone: their last layer's FFN runs on one
    row per sequence, and loss, logits and every gradient equal the full computation's (forced by recording the
    hidden states, which needs every position)."""
    model, config = build_head(head_name)
    model.train()  # dropout is 0 in the tiny config
    batch = make_inputs(head_name, config, with_labels=True)
    rows = last_layer_rows(model)
    first, first_gradients = loss_and_gradients(model, batch, output_hidden_states=False)
    full, full_gradients = loss_and_gradients(model, batch, output_hidden_states=True)
    assert rows == [1, SEQ_LENGTH]
    torch.testing.assert_close(first.logits, full.logits, rtol=0, atol=FP32_TOLERANCE)
    torch.testing.assert_close(first.loss, full.loss, rtol=0, atol=FP32_TOLERANCE)
    assert_same_gradients(full_gradients, first_gradients, atol=FP32_TOLERANCE)


def test_first_token_only_is_refused_where_it_cannot_apply(build_head):
    model, config = build_head("model_encoder")
    batch = make_inputs("model_encoder", config)
    with pytest.raises(ValueError, match="first_token_only.*output_attentions / output_hidden_states"):
        model(**batch, first_token_only=True, output_hidden_states=True)
    seq2seq, config = build_head("model_encoder_decoder")
    with pytest.raises(ValueError, match="first_token_only applies to encoder-only"):
        seq2seq(**make_inputs("model_encoder_decoder", config), first_token_only=True)


# --- transformers' accessors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_name", list(HEADS))
def test_get_encoder_keeps_transformers_contract_for_modalities(build_head, head_name):
    """PreTrainedModel.get_encoder(modality): the text encoder without a modality (None where the shape has none);
    the model itself for "image", "video" and "audio", which a text model has no encoder for; a ValueError for any
    other, as BartModel does. transformers' exporters ask for the image and audio encoders to tell a multimodal model
    (is_multimodal), which they export in pieces (decompose_multimodal): asked for them, get_encoder had returned the
    text encoder, and the encoder-decoder's plain and generation exports failed."""
    from transformers.exporters.utils import decompose_for_generation, is_multimodal

    model, _ = build_head(head_name)
    assert model.get_encoder() is model.base_model.encoder
    assert model.get_decoder() is model.base_model.decoder
    for modality in ("image", "video", "audio"):
        assert model.get_encoder(modality=modality) is model
    with pytest.raises(ValueError, match="smell"):
        model.get_encoder(modality="smell")
    assert not is_multimodal(model)
    if head_name == "conditional_generation":
        ids = torch.tensor([[5, 6, 7, 2], [8, 9, 10, 2]])
        stages = decompose_for_generation(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        assert list(stages) == ["prefill", "decode"]


# --- a query with no key to attend to --------------------------------------------------------------------------


def all_padding_source_batch(config) -> dict:
    """Two sources, the second all padding, and teacher-forced decoder inputs of 4 tokens for both."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(FIRST_ORDINARY_ID, config.vocab_size, (2, 6), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]])
    decoder_ids = torch.randint(FIRST_ORDINARY_ID, config.vocab_size, (2, 4), generator=generator)
    decoder_ids[:, 0] = config.decoder_start_token_id
    return {
        "input_ids": ids.masked_fill(mask == 0, config.pad_token_id),
        "attention_mask": mask,
        "decoder_input_ids": decoder_ids,
    }


def test_all_padding_source_row_is_one_result_on_every_path(build_head, monkeypatch):
    """Cross-attention over a source that is all padding lets the decoder's queries attend to no key. SDPA (the
    default, and MarianMTModel's) and flex attention give those queries a zero attention output; eager attention
    spread them evenly over the padding positions (which hold the embeddings), 2.5 off in the logits with other
    greedy tokens, and so did the ONNX graphs traced from it. Every path now gives SDPA's: the logits at every
    decoder position, the greedy tokens, the padded and the unpadded encoder, compiled and exported."""
    from modeling_selfattn import packing

    model, config = build_head("conditional_generation", initializer_range=0.2)
    batch = all_padding_source_batch(config)
    source = {name: batch[name] for name in ("input_ids", "attention_mask")}
    implementations = ["sdpa", "eager"] + [
        name for name in ("flex_attention",) if attention_implementation_available(name)
    ]
    logits, tokens = {}, {}
    with torch.no_grad():
        for implementation in implementations:
            model.set_attn_implementation(implementation)
            logits[implementation] = model(**batch, use_cache=False).logits
            tokens[implementation] = model.generate(**source, max_new_tokens=6, do_sample=False, num_beams=1)
        model.set_attn_implementation("eager")
        exported = torch.export.export(model, (), dict(batch, use_cache=False), strict=False)
        logits["eager, torch.export"] = exported.module()(**batch, use_cache=False).logits
        # the source batch is half padding: the encoder runs unpadded above; here on its padded path
        monkeypatch.setattr(packing, "MIN_PADDING_SHARE_TO_UNPAD", 2.0)
        for implementation in ("sdpa", "eager"):
            model.set_attn_implementation(implementation)
            logits[f"{implementation}, padded encoder"] = model(**batch, use_cache=False).logits
    for name, value in logits.items():
        torch.testing.assert_close(value, logits["sdpa"], rtol=0, atol=FP32_TOLERANCE, msg=name)
    for name, value in tokens.items():
        assert torch.equal(value, tokens["sdpa"]), name


def test_all_padding_source_row_in_the_onnx_graphs(build_head, tmp_path):
    """The ONNX graphs are traced from eager attention: they give SDPA's result for the all-padding source too."""
    pytest.importorskip("onnxruntime")
    from modeling_selfattn import onnx_export
    from modeling_selfattn.onnx_export import session

    model, config = build_head("conditional_generation", initializer_range=0.2)
    batch = all_padding_source_batch(config)
    with torch.no_grad():
        expected = model(**batch, use_cache=False).logits  # SDPA, as the model is loaded
    onnx_export.export_onnx(model, tmp_path)
    encoded = session(tmp_path / "encoder_model.onnx").run(
        None, {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
    )[0]
    decoder_inputs = {
        "input_ids": batch["decoder_input_ids"].numpy(),
        "encoder_attention_mask": batch["attention_mask"].numpy(),
        "encoder_hidden_states": encoded,
    }
    logits = torch.from_numpy(session(tmp_path / "decoder_model.onnx").run(None, decoder_inputs)[0])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)  # ONNX Runtime's kernels: export's tolerance


def test_left_padded_decoder_positions_are_the_same_with_eager_and_sdpa(build_head):
    """A left-padded position of a decoder-only batch attends to no key (its own is padding, the later ones are in
    the future): eager attention gives it SDPA's zero attention output too, and so does SDPA given the same mask
    prepared by hand in the additive form (0 or the dtype's minimum), so the logits agree at every position."""
    model, config = build_head("causal_lm")
    ids = torch.randint(FIRST_ORDINARY_ID, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    ids = ids.masked_fill(mask == 0, config.pad_token_id)
    visible = torch.ones(6, 6, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    additive = torch.where(visible, 0.0, torch.finfo(torch.float32).min)
    positions = torch.arange(6).expand(2, -1)
    logits = {}
    with torch.no_grad():
        for implementation in ("sdpa", "eager"):
            model.set_attn_implementation(implementation)
            logits[implementation] = model(ids, attention_mask=mask).logits
            logits[f"{implementation}, additive 4-D mask"] = model(
                ids, attention_mask=additive, position_ids=positions
            ).logits
    for name, value in logits.items():
        torch.testing.assert_close(value, logits["sdpa"], rtol=0, atol=FP32_TOLERANCE, msg=name)


def test_whole_model_pickle_of_an_earlier_release_with_embedding_scale_loads(monkeypatch):
    """Earlier releases named SelfAttnScaledEmbedding's factor `scale`; a torch.save(model) of theirs restored an
    embedding without `embed_scale`, whose forward failed with an AttributeError."""
    import io
    import pickle

    from conftest import make_tiny_config

    from modeling_selfattn.model import SelfAttnScaledEmbedding

    torch.manual_seed(0)
    model = SelfAttnModel(make_tiny_config("encoder")).eval()
    model.get_input_embeddings().embed_scale = 2.0
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        expected = model(ids).last_hidden_state

    def earlier_release_state(embedding):
        state = dict(torch.nn.Module.__getstate__(embedding))
        state["scale"] = state.pop("embed_scale")
        return state

    buffer = io.BytesIO()
    with monkeypatch.context() as patched:
        patched.setattr(SelfAttnScaledEmbedding, "__getstate__", earlier_release_state, raising=False)
        pickle.dump(model, buffer)
    assert b"embed_scale" not in buffer.getvalue()
    restored = pickle.loads(buffer.getvalue())
    embedding = restored.get_input_embeddings()
    assert embedding.embed_scale == 2.0 and "scale" not in vars(embedding)
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).last_hidden_state, expected, rtol=0, atol=0)
