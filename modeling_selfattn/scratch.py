"""Per-thread scratch buffers on the CPU, for intermediates that one call writes, reads once and drops.

Why: on the CPU a fresh tensor of several MB is paid for again in page faults at its first touch, often more than
the pass that fills it. A buffer per thread and purpose, as large as the largest request so far, spares that;
requests beyond MAX_BYTES get a fresh tensor, so that what a thread holds for its life stays bounded. The purposes
(measured on a 2-core Xeon VM; how much a fresh tensor costs depends on what the process freed before):
- dropout.py's random words: drawing the bits of a 25 MB mask (the attention probabilities of 32x128 tokens and 12
  heads) cost as much again in page faults in a fresh tensor;
- quantization.py's per-token int8 input mapped onto [0, 255]: on fc2's 1570x1536 floats in the int8 MiniLM encoder,
  2.3 ms a call into a fresh tensor in one profiled process, 0.62-0.66 ms into the buffer; the whole int8 encoder
  1-4% less time with it (one process, alternating, four runs);
- kernels.py's feed-forward intermediate (fc1's output, read only by fc2, where fc1 runs on nn.Linear's kernel): in
  MiniLM on 32x128 tokens, in the benchmark's process, the bias copy that starts fc1's product took 5.5 ms a layer
  into a fresh 4096x1536 tensor, and the encoder ran 2.7-5.5% faster with the buffer (one process, alternating,
  three runs; a repeat of the same code in the same runs moved up to 1.3%).

Shipped with saved models (dropout.py, quantization.py and kernels.py use it).
"""

import threading

import torch
from torch.autograd.forward_ad import unpack_dual

# The largest buffer kept for one purpose: 64 MB, e.g. 10,000 tokens of a 1536-wide intermediate in float32.
MAX_BYTES = 64 * 2**20

_buffers = threading.local()


def scratch(purpose: str, count: int, dtype: torch.dtype) -> torch.Tensor:
    """`count` elements of `dtype` on the CPU, uninitialised: a view of this thread's buffer for `purpose`, valid until
    the next request for that purpose on this thread; a fresh tensor beyond MAX_BYTES, inside a compiled
    graph (which must not write to a tensor it does not own), under torch.jit.trace (which would keep this call's
    view, sized for this input, as a constant of the trace) and under a dispatch mode such as a fake-tensor mode
    (whose tensors must not be kept for later real calls)."""
    too_large = count * dtype.itemsize > MAX_BYTES
    if (
        too_large
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._len_torch_dispatch_stack() > 0
    ):
        return torch.empty(count, dtype=dtype, device="cpu")
    buffer = getattr(_buffers, purpose, None)
    if buffer is None or buffer.numel() < count or buffer.dtype != dtype:
        # A normal tensor even when first requested under inference_mode, so that calls outside it may write to it.
        with torch.inference_mode(False):
            buffer = torch.empty(count, dtype=dtype, device="cpu")
        setattr(_buffers, purpose, buffer)
    return buffer[:count]


def may_write_into_scratch(input: torch.Tensor) -> bool:
    """Whether a result computed from `input` may be written into a scratch buffer by an out= kernel: a plain CPU
    tensor (not a subclass, such as a fake tensor, whose results keep its type), without a forward-mode tangent, and
    no torch.func transform (vmap, jvp, grad) running, since those have no out= kernels."""
    return (
        type(input) is torch.Tensor
        and input.device.type == "cpu"
        and torch._C._functorch.peek_interpreter_stack() is None
        and unpack_dual(input).tangent is None
    )


def held(purpose: str) -> torch.Tensor | None:
    """This thread's buffer for `purpose`, if any (for tests and inspection)."""
    return getattr(_buffers, purpose, None)


def release(purpose: str | None = None) -> None:
    """Drop this thread's buffer for `purpose` (None: all of them); the next request makes a new one."""
    if purpose is None:
        _buffers.__dict__.clear()
    else:
        _buffers.__dict__.pop(purpose, None)
