"""Batches, models and checks shared by the test files of the fast paths (test_fast_paths.py, test_packing.py,
test_kernels.py, test_dropout.py) and of test_model.py."""

import torch
from conftest import PAD_TOKEN_ID, make_tiny_config

TOLERANCE = 1e-5
LENGTHS = (16, 9, 9, 3, 12, 1)  # repeated and single lengths: several attention groups, one of a lone token


def padded_batch(lengths=LENGTHS, padding_side="right", vocab_size=99, seed=0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    positions = torch.arange(longest)
    if padding_side == "right":
        attention_mask = (positions < torch.tensor(lengths).unsqueeze(1)).long()
    else:
        attention_mask = (positions >= longest - torch.tensor(lengths).unsqueeze(1)).long()
    input_ids = torch.randint(3, vocab_size, attention_mask.shape, generator=generator)
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, PAD_TOKEN_ID), "attention_mask": attention_mask}


def build(model_class, shape="encoder", seed=0, **overrides):
    torch.manual_seed(seed)
    config = make_tiny_config(shape, **overrides)
    return model_class(config).eval()


def assert_same_weights(model, other) -> None:
    """Every tensor of the state dict equal, bit for bit (copies of the same weights)."""
    expected, actual = model.state_dict(), other.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def loss_and_gradients(model, batch: dict, seed: int | None = None, **forward_kwargs):
    """One forward and backward of `model` on `batch` (after torch.manual_seed(seed) when given, so that dropout
    draws the same masks): (its outputs, every parameter's gradient)."""
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    outputs = model(**batch, **forward_kwargs)
    outputs.loss.backward()
    return outputs, {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def assert_same_gradients(expected: dict, actual: dict, atol: float) -> None:
    """The same parameters, each gradient within `atol`."""
    assert actual.keys() == expected.keys()
    for name, gradient in expected.items():
        torch.testing.assert_close(actual[name], gradient, rtol=0, atol=atol, msg=name)
