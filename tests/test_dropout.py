"""dropout.py: the CPU dropout mask drawn from 32-bit words, against torch's dropout semantics, and the training
attention that uses it in place of SDPA's math path."""

import math

import pytest
import torch
from batch_helpers import assert_same_gradients, loss_and_gradients, padded_batch
from conftest import make_tiny_config

from modeling_selfattn import scratch
from modeling_selfattn.dropout import Dropout, apply_dropout, dropout_mask, zero_dropped
from modeling_selfattn.model import (
    SelfAttnAttention,
    SelfAttnForCausalLM,
    SelfAttnForConditionalGeneration,
    SelfAttnForMaskedLM,
    eager_attention_forward,
)

PROBABILITIES = [0.1, 0.5, 0.9]


@pytest.mark.parametrize("p", PROBABILITIES)
def test_drop_rate_is_p_on_every_position_of_a_word(p):
    torch.manual_seed(0)
    count = 2**21
    dropped = ~dropout_mask(torch.Size([count]), p)
    # Five standard deviations of a binomial fraction; the two halves of each 64-bit word (even and odd positions)
    # are checked apart, and together, so that a biased bit or a correlated pair would show.
    bound = 5 * math.sqrt(p * (1 - p) / (count // 2))
    assert abs(dropped[0::2].float().mean().item() - p) < bound
    assert abs(dropped[1::2].float().mean().item() - p) < bound
    both = (dropped[0::2] & dropped[1::2]).float().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (count // 2))


@pytest.mark.parametrize("p", PROBABILITIES)
def test_output_and_gradient_are_torch_dropout_semantics_for_the_drawn_mask(p):
    generator = torch.Generator().manual_seed(1)
    input = (torch.rand(64, 3, 33, generator=generator) + 0.5).requires_grad_()  # no zeros: a zero output = dropped
    torch.manual_seed(2)
    output = apply_dropout(input, p, training=True)
    torch.manual_seed(2)
    kept = dropout_mask(input.shape, p)
    scale = 1.0 / (1.0 - p)
    torch.testing.assert_close(output, torch.where(kept, input * scale, 0.0), rtol=1e-6, atol=0)
    assert torch.equal(output != 0, kept)
    incoming = torch.randn(input.shape, generator=generator)
    output.backward(incoming)
    torch.testing.assert_close(input.grad, torch.where(kept, incoming * scale, 0.0), rtol=1e-6, atol=0)


def test_zero_dropped_leaves_the_scale_to_the_caller():
    """zero_dropped draws the same mask as apply_dropout and leaves the factor out; times the factor it is
    apply_dropout's output, in value and gradient. Where torch's dropout runs, its output and a factor of 1."""
    input = (torch.rand(8, 4, 16, 16) + 0.5).requires_grad_()
    torch.manual_seed(8)
    expected = apply_dropout(input, 0.2, training=True)
    torch.manual_seed(8)
    zeroed, scale = zero_dropped(input, 0.2, training=True)
    assert scale == 1.0 / 0.8
    torch.testing.assert_close(zeroed * scale, expected, rtol=1e-6, atol=0)
    incoming = torch.randn(input.shape)
    (expected_gradient,) = torch.autograd.grad(expected, input, incoming)
    (gradient,) = torch.autograd.grad(zeroed * scale, input, incoming)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-6, atol=0)
    output, scale = zero_dropped(input, 0.2, training=False)
    assert output is input and scale == 1.0


def test_backward_keeps_only_the_mask():
    """As torch's dropout: one byte an element is kept for backward, not the input."""
    saved = []

    def pack(tensor):
        saved.append(tensor.dtype)
        return tensor

    input = torch.rand(16, 33, requires_grad=True)
    for function in (apply_dropout, lambda input, p: zero_dropped(input, p)[0]):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            function(input, 0.3).sum().backward()
        assert saved == [torch.bool]


def test_masks_drawn_under_inference_mode_leave_training_working():
    """The scratch buffer of random words may first be made under inference_mode (MC dropout, a pipeline called on a
    model in training mode); later training steps still draw into it."""
    scratch.release()
    with torch.inference_mode():
        apply_dropout(torch.rand(64, 64), 0.5)
    input = torch.rand(64, 64, requires_grad=True)
    apply_dropout(input, 0.5).sum().backward()
    assert input.grad is not None


def test_masks_beyond_the_scratch_buffer_are_drawn_fresh(monkeypatch):
    monkeypatch.setattr(scratch, "MAX_BYTES", 100 * 8)  # 100 int64 words
    scratch.release()
    torch.manual_seed(9)
    large = dropout_mask(torch.Size([1000]), 0.5)
    assert scratch.held("dropout words") is None  # not kept
    torch.manual_seed(9)
    assert torch.equal(dropout_mask(torch.Size([1000]), 0.5), large)
    dropout_mask(torch.Size([150]), 0.5)
    assert scratch.held("dropout words").numel() == 75


@pytest.mark.parametrize("masked", [False, True])
def test_training_attention_is_softmax_dropout_values_by_hand(masked):
    """eager_attention_forward in training: softmax(Q K^T / sqrt(d) + mask), dropped with the mask drawn from the
    seed and scaled by 1 / (1 - p), times V; the returned probabilities are the kept ones before the scale."""
    config = make_tiny_config("encoder", attention_dropout=0.25)
    module = SelfAttnAttention(config, layer_idx=0).train()
    generator = torch.Generator().manual_seed(10)
    query, key, value = (torch.randn(2, 4, 6, 8, generator=generator) for _ in range(3))
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2]).view(2, 1, 1, 6) if masked else None
    torch.manual_seed(11)
    output, probabilities = eager_attention_forward(module, query, key, value, mask, scaling=8**-0.5, dropout=0.25)
    scores = query @ key.transpose(-1, -2) / math.sqrt(8)
    if masked:
        scores = scores.masked_fill(~mask, float("-inf"))
    expected_probabilities = scores.softmax(-1)
    torch.manual_seed(11)
    kept = dropout_mask(expected_probabilities.shape, 0.25)
    expected = (torch.where(kept, expected_probabilities, 0.0) / 0.75) @ value
    torch.testing.assert_close(output, expected.transpose(1, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(probabilities, torch.where(kept, expected_probabilities, 0.0), rtol=0, atol=1e-6)


def test_masks_follow_the_seed():
    shape = torch.Size([7, 1001])  # odd count: the last word is half used
    torch.manual_seed(3)
    first = dropout_mask(shape, 0.3)
    torch.manual_seed(3)
    assert torch.equal(dropout_mask(shape, 0.3), first)
    assert not torch.equal(dropout_mask(shape, 0.3), first)  # the generator moved on


def test_torch_dropout_runs_where_the_mask_is_not_drawn(monkeypatch):
    calls = []
    torch_dropout = torch.nn.functional.dropout
    monkeypatch.setattr(
        torch.nn.functional, "dropout", lambda *args, **kwargs: calls.append(args) or torch_dropout(*args, **kwargs)
    )
    input = torch.randn(4, 5)
    assert torch.equal(apply_dropout(input, 0.5, training=False), input)
    assert torch.equal(apply_dropout(input, 0.0, training=True), input)
    assert torch.equal(apply_dropout(input, 1.0, training=True), torch.zeros_like(input))
    assert apply_dropout(torch.empty(4, 5, device="meta"), 0.5, training=True).device.type == "meta"
    assert len(calls) == 4
    with pytest.raises(ValueError, match="probability"):
        apply_dropout(input, 1.5, training=True)
    calls.clear()
    apply_dropout(input, 0.5, training=True)
    assert calls == []  # the CPU draw


def test_dropout_module_is_nn_dropout_with_the_cpu_draw():
    module = Dropout(0.25)
    assert isinstance(module, torch.nn.Dropout) and module.state_dict() == {}
    input = torch.rand(32, 64) + 0.5
    torch.manual_seed(4)
    output = module(input)
    torch.manual_seed(4)
    assert torch.equal(output != 0, dropout_mask(input.shape, 0.25))
    assert torch.equal(module.eval()(input), input)


DROPOUT = dict(hidden_dropout_prob=0.1, attention_dropout=0.1, activation_dropout=0.1)


def train_outputs(model_class, shape, attn_implementation, batch, seed=5):
    """(loss, gradients) of a seeded model with dropout 0.1 after one forward and backward with masks from `seed`."""
    torch.manual_seed(0)
    model = model_class(make_tiny_config(shape, attn_implementation=attn_implementation, **DROPOUT)).train()
    outputs, gradients = loss_and_gradients(model, batch, seed=seed)
    return outputs.loss.detach(), gradients


@pytest.mark.parametrize(
    "model_class, shape",
    [
        (SelfAttnForMaskedLM, "encoder"),
        (SelfAttnForConditionalGeneration, "encoder_decoder"),
        (SelfAttnForCausalLM, "decoder"),
    ],
)
@pytest.mark.parametrize("padding", ["padded", "full"])
def test_sdpa_training_with_dropout_is_eager_attention_with_the_same_masks(model_class, shape, padding):
    """With dropout on, SDPA models train through eager_attention_forward on the CPU, handed SDPA's boolean masks
    (or none, for a causal layer over a full batch): the same loss and gradients as an eager model drawing the same
    masks, with padding and without."""
    batch = padded_batch((7, 7, 7) if padding == "full" else (7, 3, 5))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    if shape == "encoder_decoder":
        batch = {**batch, "labels": labels[:, :5].contiguous()}
    else:
        batch = {**batch, "labels": labels}
    eager_loss, eager_gradients = train_outputs(model_class, shape, "eager", batch)
    sdpa_loss, sdpa_gradients = train_outputs(model_class, shape, "sdpa", batch)
    torch.testing.assert_close(sdpa_loss, eager_loss, rtol=0, atol=1e-5)
    assert_same_gradients(eager_gradients, sdpa_gradients, atol=1e-5)
    # and the masks are drawn: another seed changes the loss
    other_loss, _ = train_outputs(model_class, shape, "sdpa", batch, seed=6)
    assert abs(other_loss.item() - sdpa_loss.item()) > 1e-4


def test_gradient_checkpointing_draws_the_same_masks_again():
    batch = padded_batch((9, 4, 6))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    model = SelfAttnForMaskedLM(make_tiny_config("encoder", **DROPOUT)).train()
    outputs, gradients = loss_and_gradients(model, batch, seed=7)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed, checkpointed_gradients = loss_and_gradients(model, batch, seed=7)
    torch.testing.assert_close(checkpointed.loss, outputs.loss, rtol=0, atol=1e-6)
    assert_same_gradients(gradients, checkpointed_gradients, atol=1e-6)
