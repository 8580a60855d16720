"""Dropout whose mask is drawn faster on the CPU.

torch's CPU dropout draws one Bernoulli sample per element, about 8 ns an element on a 2-core Xeon: in a MiniLM
training step (32x128 tokens, dropout 0.1) the masks took a quarter of the step, more than all the attention
products. Here the mask comes from 32 random bits an element, drawn from the same default generator as 64-bit words
(about 2.7 ns an element): an element is kept when its bits, read as a signed 32-bit integer, are at least
round(p * 2**32) - 2**31. So it is dropped with probability round(p * 2**32) / 2**32, which is p to within 2**-33
(float32 itself holds p only to a relative 6e-8), and the kept ones are scaled by 1 / (1 - p) as torch does. The
masks follow torch.manual_seed, and gradient checkpointing, which restores the generator's state, draws them again
the same. Backward multiplies by the same mask, kept as one byte an element as torch keeps it, and nothing else.

Only the draw differs from torch's dropout; on other devices (CUDA draws inside a fused kernel), for tensor
subclasses, in evaluation, for p = 0 and for p so close to 1 that no element could be kept, torch's own dropout runs. Shipped with saved models
(imported by model.py).
"""

import torch
from torch import nn

from .scratch import scratch

# 2**32 kept/dropped bins; a threshold this large would keep no element (and does not fit an int32).
BINS = 2**32


def random_words(count: int) -> torch.Tensor:
    """`count` random int64 words on the CPU, from the default generator. They are read once, by the comparison that
    makes the mask, so they go into this thread's scratch buffer (scratch.py): a view valid until the next call, or a
    fresh tensor."""
    return scratch("dropout words", count, torch.int64).random_(-(2**63), None)


def dropout_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A boolean CPU mask of `shape`, True (kept) with probability 1 - round(p * 2**32) / 2**32."""
    count = shape.numel()
    bits = random_words((count + 1) // 2).view(torch.int32)[:count].view(shape)
    return bits >= round(p * BINS) - BINS // 2


def draws_here(input: torch.Tensor, p: float, training: bool) -> bool:
    """Whether the mask is drawn here: in training, for a plain CPU tensor and 0 < p with some element kept. p outside
    [0, 1] (NaN included) goes to torch's dropout, whose error names it."""
    return (
        training
        and 0.0 < p <= 1.0
        and round(p * BINS) < BINS
        and type(input) is torch.Tensor
        and input.device.type == "cpu"
    )


def zero_dropped(input: torch.Tensor, p: float, training: bool = True) -> tuple[torch.Tensor, float]:
    """Dropout split in two: `input` with the dropped elements zeroed, and the factor 1 / (1 - p) still to apply, so
    that the caller can apply it to a smaller tensor downstream (the attention output rather than the probabilities).
    Backward keeps only the mask (one byte an element, as torch's dropout). Where the mask is not drawn here, torch's
    dropout output and a factor of 1."""
    if not draws_here(input, p, training):
        return nn.functional.dropout(input, p, training), 1.0
    return torch.where(dropout_mask(input.shape, p), input, 0.0), 1.0 / (1.0 - p)


def apply_dropout(input: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """nn.functional.dropout(input, p, training) with the mask drawn as above where the input is a CPU tensor."""
    output, scale = zero_dropped(input, p, training)
    # In place on the new tensor that zero_dropped made (its gradient needs neither it nor the factor).
    return output.mul_(scale) if scale != 1.0 else output


class Dropout(nn.Dropout):
    """nn.Dropout drawing its CPU mask as above; no parameters or buffers, so checkpoints are unchanged."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return input  # as torch's; early, since decoding calls each dropout once a token
        if self.inplace:
            return super().forward(input)
        return apply_dropout(input, self.p, self.training)
