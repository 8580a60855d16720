"""The kernel behind the model's linear layers. For float32 inference on an x86 CPU: the faster of oneDNN (with
bias and the feed-forward activation in the same pass) and nn.Linear's own, timed once per shape; for float32
training there, the faster of the two for the layer's three products (output, input gradient, weight gradient),
timed together once per shape (OneDNNLinearFunction); everywhere else (other devices and dtypes, autocast, tracing
for export, torch.compile, torch.func transforms) nn.Linear's own.

Why time it: nn.Linear goes through the BLAS torch was built with (MKL on x86). On AMD CPUs MKL takes an AVX2-class
path, about 41% of the measured float32 GEMM peak, where oneDNN reaches about 90%; on Intel Xeons both are near the
peak, and which one wins depends on the shape (measured on a 2-core Xeon with AVX-512: oneDNN 1.3-1.9x on 16-32
rows, MKL up to 1.25x on 384-wide products of a few hundred rows). No fixed rule wins on every CPU and shape, so the
default ("auto") times both kernels on the first call of each (input width, output width, activation, row count
rounded up to a power of two, thread count) and keeps the faster for the rest of the process. The first call of each
such shape costs the timing: each kernel runs once untimed, then alternately until each has run for
MIN_TIMED_SECONDS (at least MIN_TIMED_RUNS times, at most MAX_TIMED_RUNS), so a large product runs eight times, a
small one up to 42; its result is the chosen kernel's, like every later call's. Compiled graphs (torch.compile) take
the choice made so far in eager mode, and for a shape not yet timed oneDNN (nn.Linear's kernel below ONEDNN_MIN_ROWS
rows), since a trace cannot time. The two kernels sum in another order, so results agree to float32 rounding
(within 1e-5), not to the bit, and another process may choose otherwise. Few-row products (decoding) are timed too:
there the winner depends on the CPU most of all (see ONEDNN_MIN_ROWS); a weight too large to stay in cache (an LM
head) takes oneDNN untimed on 4-7 rows, which it reads faster from memory, as timing cannot tell (see
ONEDNN_STREAMED_MIN_ROWS).

The weights are read as they are at every call: nothing is cached but the choice, so no change to the weights (an
optimizer step, load_state_dict, PEFT's merge through `.data`) can leave a stale copy behind. "auto-packed" and
"onednn-packed" keep, per weight, a copy in the layout oneDNN reads fastest: quicker for few-row products (on a Xeon
1.7-2.4x MKL on 16 rows, against 1.3-1.5x; on an AMD EPYC 1.2-1.9x plain oneDNN on 2-16 rows of decoder weights), at
the cost of a second copy of each weight and of a rule: a change that bypasses autograd's version counter
(`weight.data` edits) is not seen until `set_linear_kernel` or `drop_changed_packed_weights` is called (compiled
decoding, which packs, calls the latter at every generate()).

`set_linear_kernel(model, "auto" | "auto-packed" | "onednn" | "onednn-packed" | "aten")` chooses; "onednn" forces
oneDNN on the weights as they are. Shipped with saved models (imported by model.py). No global torch setting is
changed; the ones read are whether oneDNN is enabled and the thread count (part of the timed shape).
"""

import functools
import math
import platform
import time
import types
import weakref
from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import GELUActivation

from .scratch import may_write_into_scratch, scratch

# The packed copies of "auto-packed" and "onednn-packed", kept per storage so that they go when the weights go; within
# a storage (several weights may be views of one, e.g. when loaded from a single file) by the weight's place in it,
# with the weight's version and fingerprint when packed: an in-place change through autograd (optimizer step,
# load_state_dict) repacks at the next call, one that bypasses it (`weight.data` edits) where
# drop_changed_packed_weights finds it.
_onednn_packed_weights: "weakref.WeakKeyDictionary[torch.UntypedStorage, dict]" = weakref.WeakKeyDictionary()


def weight_place(weight: torch.Tensor) -> tuple:
    return weight.storage_offset(), tuple(weight.shape), tuple(weight.stride())


def fingerprint(weight: torch.Tensor) -> int:
    """A hash of the weight's bits that any edit changes in practice, a moved element too: each row's bits (read as
    integers, wrapping) summed with weights by column, then the rows' sums with weights by row. Read as int64 pairs
    where the layout allows (one matrix-vector product over the weight: 3.8 ms for 64 MB on a 2-core AMD EPYC),
    else as int32 widened."""
    bits = weight.detach().reshape(weight.shape[0] if weight.dim() else 1, -1)
    if bits.shape[1] % 2 == 0 and bits.is_contiguous() and bits.storage_offset() % 2 == 0:
        bits = bits.view(torch.int64)
    else:
        bits = bits.contiguous().view(torch.int32).long()
    by_column = torch.arange(1, bits.shape[1] + 1, dtype=torch.int64).mul_(0x9E3779B1)
    by_row = torch.arange(1, bits.shape[0] + 1, dtype=torch.int64).mul_(0x85EBCA77)
    return int(torch.mv(bits, by_column).mul_(by_row).sum())


def onednn_packed_weight(weight: torch.Tensor) -> torch.Tensor:
    storage = weight.untyped_storage()
    packed = _onednn_packed_weights.get(storage)
    if packed is None:  # not setdefault: this runs on every call, and would build a dict each time
        packed = _onednn_packed_weights[storage] = {}
    place = weight_place(weight)
    entry = packed.get(place)  # read once: another thread may drop it (drop_changed_packed_weights)
    if entry is None or entry[0] != weight._version:
        entry = (weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.detach()), fingerprint(weight))
        packed[place] = entry
    return entry[1]


def drop_changed_packed_weights(model: nn.Module) -> None:
    """Drops the packed copy of each selfattn Linear weight in `model` that changed since it was packed, autograd's
    version counter aside (an edit through `weight.data`, as PEFT's merge makes): the next call packs it again. Reads
    each packed weight once (compiled decoding calls it at every generate())."""
    for module in model.modules():
        if isinstance(module, Linear):
            packed = _onednn_packed_weights.get(module.weight.untyped_storage())
            place = weight_place(module.weight)
            entry = packed.get(place) if packed else None
            if entry is not None and entry[2] != fingerprint(module.weight):
                packed.pop(place, None)


def onednn_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str, packed: bool
) -> torch.Tensor:
    """input @ weight.T + bias, then `activation` ("none", "gelu" with erf, "relu") in the same pass over the
    output; on the packed copy of the weight if `packed`."""
    algorithm = "none" if activation == "gelu" else ""
    weight = onednn_packed_weight(weight) if packed else weight
    return torch.ops.mkldnn._linear_pointwise(input, weight, bias, activation, [], algorithm)


def onednn_linear_shape(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str, packed: bool
) -> torch.Tensor:
    return input.new_empty(*input.shape[:-1], weight.shape[0])


# The Library of each operator this process defined (define_operator), by name: a Library unregisters its
# operators when it goes. Kept when this module is executed again (importlib.reload).
OPERATOR_LIBRARIES: dict[str, torch.library.Library]
if globals().get("OPERATOR_LIBRARIES") is None:
    OPERATOR_LIBRARIES = {}


def define_operator(name: str, arguments: str, kernel: Callable, shape: Callable) -> None:
    """torch.ops.selfattn.<name>(<arguments>) -> Tensor, run by `kernel` on CPU tensors; `shape` gives the output of
    the fake tensors a compiled graph is traced with (the Meta key). For calls a compiled graph must keep opaque.

    Defined through torch.library.Library, with a CPU kernel and a shape function only: torch.library.custom_op's
    wrapper (autograd, argument checks) cost ~15 us more a call (measured: 69-78 against 58-63 us on a 16-row
    512x512 oneDNN product); these operators run only where no gradient is needed. Once per process: torch refuses
    a second registration (the defining file may be imported twice, as the package and as a saved model's remote
    code, or reloaded), so an operator that exists is left as it is."""
    if hasattr(torch.ops.selfattn, name):
        return
    library = torch.library.Library("selfattn", "FRAGMENT")  # not "DEF", which would claim the namespace
    library.define(f"{name}({arguments}) -> Tensor")
    library.impl(name, kernel, "CPU")
    library.impl(name, shape, "Meta")
    OPERATOR_LIBRARIES[name] = library


# torch.compile cannot trace oneDNN's packed tensors; as an operator of its own the call stays opaque inside a compiled
# graph.
define_operator(
    "onednn_linear", "Tensor input, Tensor weight, Tensor? bias, str activation, bool packed", onednn_linear,
    onednn_linear_shape,
)


# With fewer input rows (tokens) than this, which kernel wins depends on the CPU more than on anything else: on a
# 2-core Xeon, MKL was faster on weights in cache (oneDNN 0.15-0.8x MKL below eight rows, LM heads included); on a
# 2-core AMD EPYC (Zen 5), where MKL's products of a few rows run far from the memory's bandwidth, oneDNN took
# 0.24-0.72x MKL's time on one to four rows of 2048x512 weights and of a 58,101x512 LM head, and was 1.27x slower
# only on one row of a 512x512 weight. "auto" times them like any other shape; a compiled graph that finds no
# choice yet keeps MKL there, as measured on the Xeon...
ONEDNN_MIN_ROWS = 8
# ...and a weight of at least STREAMED_WEIGHT_ELEMENTS floats (8 MB: an LM head, a large feed-forward) with
# ONEDNN_STREAMED_MIN_ROWS to ONEDNN_MIN_ROWS - 1 rows (beam search, small batches) takes oneDNN untimed. In a model
# such a weight is read from memory at every call, the other layers' weights having taken the cache since, and
# there MKL's products of 4-7 rows took 1.3-1.9x oneDNN's time on weights of 8-64 MB (measured on a 2-core Xeon,
# cycling through Transformer-base's decoder weights as a decoding step does; Transformer-base's 32,000x512 LM head
# at 4 rows: 6.5 against 4.7 ms), while on a weight already in cache the two were level (3.43 against 3.40 ms):
# "auto"'s timing, which repeats the call on one weight, cannot see the difference. With 3 rows or fewer MKL stayed
# faster there (the same LM head: 3.0 against 3.7 ms), and timing decides. In beam search with 4 beams
# (Transformer-base, one process, alternating): 5.1-9.1% less time in three runs, the same tokens.
ONEDNN_STREAMED_MIN_ROWS = 4
STREAMED_WEIGHT_ELEMENTS = 2 * 2**20

# Measured on x86 CPUs only (AMD Zen 5; Intel Xeons with and without AMX); elsewhere "auto" keeps nn.Linear's kernel.
ONEDNN_AVAILABLE = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()

LINEAR_KERNELS = ("auto", "auto-packed", "onednn", "onednn-packed", "aten")
PACKED_KERNELS = ("auto-packed", "onednn-packed")

# nn.Linear's path with the activation as the feed-forward applies it unfused (GELUActivation calls torch's gelu), in
# place on the product, which nothing else holds: a fresh tensor of the product's size costs more than the activation
# itself on a 2-core Xeon VM (see linear_then_activation). Results are torch's gelu and relu, bit for bit.
ATEN_ACTIVATIONS = {"none": lambda x: x, "gelu": torch.ops.aten.gelu_, "relu": torch.relu_}


def aten_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str, into_scratch: bool = False
) -> torch.Tensor:
    """activation(nn.functional.linear(input, weight, bias)), the activation in place; with `into_scratch`, the product
    in this thread's scratch buffer for the feed-forward's intermediate (scratch.py: fc1 writes it, fc2 reads it once;
    valid until the next such call), by the same kernel nn.functional.linear calls for a contiguous input."""
    if not into_scratch:
        return ATEN_ACTIVATIONS[activation](nn.functional.linear(input, weight, bias))
    rows = input.reshape(-1, input.shape[-1])
    output = scratch("ffn intermediate", rows.shape[0] * weight.shape[0], torch.float32)
    output = output.view(rows.shape[0], weight.shape[0])
    if bias is None:
        torch.mm(rows, weight.t(), out=output)
    else:
        torch.addmm(bias, rows, weight.t(), out=output)
    return ATEN_ACTIVATIONS[activation](output.view(*input.shape[:-1], weight.shape[0]))


# The timed kernels' choices for this process, per thread count: {threads: {(in_features, out_features, activation,
# row bucket, packed) or (in_features, out_features, "training", row bucket): "onednn" | "aten"}}; and the thread
# count of the latest eager call, which compiled graphs (that cannot read it) use.
_chosen_kernels: dict[int, dict[tuple, str]] = {}
_eager_threads = [torch.get_num_threads()]

# Each kernel runs once untimed (oneDNN builds its primitive on a shape's first call), then alternately until each
# has run this long in all (at least MIN_TIMED_RUNS times, at most MAX_TIMED_RUNS); the fastest run of each decides.
# Products of a few microseconds need many runs for their fastest to be stable; large ones, a few.
MIN_TIMED_SECONDS = 2e-3
MIN_TIMED_RUNS = 3
MAX_TIMED_RUNS = 20


def eager_choices() -> dict[tuple, str]:
    """The choices made for the current thread count, which compiled graphs will read (see _eager_threads)."""
    _eager_threads[0] = threads = torch.get_num_threads()
    return _chosen_kernels.setdefault(threads, {})


def row_bucket(rows: int) -> int:
    """`rows` rounded up to a power of two: the kernels' relative speed changes slowly with the row count."""
    return 1 << (rows - 1).bit_length()


def time_kernels(runs: dict) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Seconds of the fastest timed run of each callable in `runs` (see MIN_TIMED_SECONDS), and each one's output."""
    outputs = {name: run() for name, run in runs.items()}
    fastest, total = dict.fromkeys(runs, float("inf")), dict.fromkeys(runs, 0.0)
    for timed_runs in range(1, MAX_TIMED_RUNS + 1):
        for name, run in runs.items():
            del outputs[name]  # one output per kernel alive at a time: an LM head's can be hundreds of MB
            start = time.perf_counter()
            outputs[name] = run()
            elapsed = time.perf_counter() - start
            fastest[name], total[name] = min(fastest[name], elapsed), total[name] + elapsed
        if timed_runs >= MIN_TIMED_RUNS and min(total.values()) >= MIN_TIMED_SECONDS:
            break
    return fastest, outputs


def input_gradient(grad_output: torch.Tensor, weight: torch.Tensor, on_onednn: bool) -> torch.Tensor:
    """grad_output @ weight: on oneDNN (which reads the transposed weight in place) or by torch's own product."""
    if on_onednn:
        return onednn_linear(grad_output, weight.t(), None, "none", False)
    return grad_output @ weight


def weight_gradient(grad_output: torch.Tensor, input: torch.Tensor, on_onednn: bool) -> torch.Tensor:
    """grad_output^T @ input over all rows: on oneDNN (which copies the transposed input) or by torch's product."""
    grad_rows, rows = grad_output.reshape(-1, grad_output.shape[-1]), input.reshape(-1, input.shape[-1])
    if on_onednn:
        return onednn_linear(grad_rows.t(), rows.t(), None, "none", False)
    return grad_rows.t() @ rows


def training_products(input: torch.Tensor, weight: torch.Tensor, grad_output: torch.Tensor, on_onednn: bool) -> tuple:
    """The three products of a linear layer's training step (output, input gradient, weight gradient), as timed."""
    output = onednn_linear(input, weight, None, "none", False) if on_onednn else nn.functional.linear(input, weight)
    return output, input_gradient(grad_output, weight, on_onednn), weight_gradient(grad_output, input, on_onednn)


class OneDNNLinearFunction(torch.autograd.Function):
    """input @ weight.T + bias and its gradients, each product on oneDNN. A backward that itself needs a graph (a
    gradient of gradients, create_graph=True) takes torch's own differentiable products instead.

    Why: on the AMD EPYC (Zen 5) MKL's float32 products, which autograd's own backward runs, reach 180-225 GFLOP/s
    on MiniLM's training shapes (2,048-4,096 rows of 384x1,536, 1,536x384, 384x384), oneDNN's 320-530, the two
    gradients read as strided views without a copy (measured alone, one process). The masked-LM step of
    all-MiniLM-L6-v2 on 16x128 tokens went from 1.43x transformers' speed to 2.25x, the classification step on
    32x128 from 1.31x to 2.10x."""

    @staticmethod
    def forward(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return onednn_linear(input, weight, bias, "none", False)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        input, weight, bias = inputs
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple:
        input, weight = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        on_onednn = not torch.is_grad_enabled()  # with a graph to record: torch's differentiable products
        grad_input = input_gradient(grad_output, weight, on_onednn) if ctx.needs_input_grad[0] else None
        grad_weight = weight_gradient(grad_output, input, on_onednn) if ctx.needs_input_grad[1] else None
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_input, grad_weight, grad_bias


class Linear(nn.Linear):
    """nn.Linear (same parameters, state dict, training and autograd) whose CPU float32 inference and training on
    x86 run as `kernel` says (training on the weights as they are, never packed copies, which each step changes):
    "auto" (the default) the faster of oneDNN and nn.Linear's own, timed once per shape (see above), "auto-packed"
    the same with oneDNN on a packed copy of the weight, "onednn" oneDNN, "onednn-packed" oneDNN on a packed copy,
    "aten" nn.Linear's own. A large weight (see ONEDNN_STREAMED_MIN_ROWS) takes oneDNN untimed from 4 to 7 rows
    under the timed settings. oneDNN runs only where input and weight are plain float32 CPU tensors (not a quantised
    or other tensor subclass), oneDNN is enabled and CPU autocast is not, and never while tracing or exporting, so
    that exported graphs hold standard linear ops; where autograd records the call (input, weight or bias requires a
    gradient), only through OneDNNLinearFunction (autograd_takes_onednn). Results match nn.Linear's up to float32
    rounding (the kernels sum in another order)."""

    kernel: str = "auto"
    # Its kernels may round a row otherwise in a product of another size, so a feed-forward does not take its rows a
    # block at a time for speed (rows_per_block). Declared, not left to getattr's default: that lookup would raise
    # and catch an AttributeError in nn.Module on every feed-forward call (1.4 us, measured).
    rows_alone = False

    def onednn_suits(self, input: torch.Tensor) -> bool:
        """Whether this call's tensors and torch's settings let oneDNN run it (see the class), gradient aside."""
        # Cheapest first: this runs on every call, and a decoding step makes dozens of calls of one row each. The
        # device first: under torch.compile, what is read here is checked before every compiled call, and a GPU's
        # calls then check nothing of the layer's.
        if input.device.type != "cpu" or self.kernel == "aten" or not ONEDNN_AVAILABLE or input.numel() == 0:
            return False
        weight, bias = self.weight_and_bias()
        return not (
            weight is None  # computed by a parametrization: nn.Linear's business
            or input.dtype != torch.float32
            or weight.dtype != torch.float32
            or weight.device.type != "cpu"
            or type(weight) is not nn.Parameter
            or (bias is not None and not bias.is_contiguous())  # oneDNN reads a strided bias wrongly
            or weight.numel() == 0  # an attention whose heads were all pruned; oneDNN takes no empty weight
            or not torch.backends.mkldnn.enabled
            or torch.is_autocast_enabled("cpu")  # autocast casts nn.Linear's inputs: leave them to it
            or torch.jit.is_tracing()
            or torch.compiler.is_exporting()
        )

    def weight_and_bias(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The weight and bias as registered (None where a parametrization computes the weight), read from
        `_parameters`: nn.Module's attribute lookup took 0.4 us a read, several reads a call, and a decoding step
        makes dozens of calls of one row (6-7 us of overhead a call against nn.Linear's, 4 us without these reads)."""
        parameters = self._parameters
        return parameters.get("weight"), parameters.get("bias")

    def records_gradient(self, input: torch.Tensor) -> bool:
        weight, bias = self.weight_and_bias()
        return torch.is_grad_enabled() and (
            input.requires_grad
            or weight is None  # computed by a parametrization, whose source may train
            or weight.requires_grad
            or (bias is not None and bias.requires_grad)
        )

    def may_run_onednn(self, input: torch.Tensor) -> bool:
        """Inference on oneDNN: the call suits it and autograd records nothing."""
        return self.onednn_suits(input) and not self.records_gradient(input)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The kernel "auto" chose for this shape, looked up once for the call. A shape kept on nn.Linear's kernel goes
        # straight to it in inference: the checks of onednn_suits decide only whether oneDNN may run. With them, greedy
        # decoding at batch 1 (Transformer-base, one-row calls) took 4.7-6.6% more time than with nn.Linear forced
        # (four runs, 2-core Xeon with AMX), a one-row call of a 512x512 weight 20.6 us against nn.Linear's 13.7 us.
        chosen = self.recorded_kernel(input)
        if chosen == "aten" and not self.records_gradient(input):
            return super().forward(input)
        if self.onednn_suits(input):
            if not self.records_gradient(input):
                return self.inference_forward(input, chosen=chosen)
            if self.autograd_takes_onednn(input) and self.training_kernel(input) == "onednn":
                return OneDNNLinearFunction.apply(input, self.weight, self.bias)
        return super().forward(input)

    def recorded_kernel(self, input: torch.Tensor) -> str | None:
        """The kernel eager timing chose in this process for a call of `input`'s shape without activation (see
        timed_kernel); None where none was chosen yet, the setting is not "auto", or there is no row count to look up
        (compiling, a traced value, a layer with no inputs after pruning every head)."""
        if not self.kernel.startswith("auto") or self.in_features == 0 or torch.compiler.is_compiling():
            return None
        rows = input.numel() // self.in_features
        if not isinstance(rows, int):  # torch.jit.trace's traced value
            return None
        return eager_choices().get(self.timing_key(rows, "none", self.kernel in PACKED_KERNELS))

    def autograd_takes_onednn(self, input: torch.Tensor) -> bool:
        """Where autograd records a call that suits oneDNN: plain tensors in eager mode, outside torch.func
        transforms, dispatch modes and forward-mode AD (OneDNNLinearFunction has no jvp), whose gradients stay
        nn.Linear's own business."""
        return (
            type(input) is torch.Tensor
            and (self.bias is None or type(self.bias) is nn.Parameter)
            and not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is None
            and torch._C._len_torch_dispatch_stack() == 0
            and torch.autograd.forward_ad._current_level < 0
        )

    def training_kernel(self, input: torch.Tensor) -> str:
        """"onednn" or "aten" for a training call's three products (output, input gradient, weight gradient):
        forced by the kernel setting, else timed together once per shape like inference's products."""
        if not self.kernel.startswith("auto"):
            return "onednn"
        choices = eager_choices()
        key = (self.in_features, self.out_features, "training", row_bucket(input.numel() // self.in_features))
        kernel = choices.get(key)
        if kernel is None:
            with torch.no_grad():
                sample, weight = input.detach(), self.weight.detach()
                grad_output = input.new_ones(*input.shape[:-1], self.out_features)
                try:
                    seconds, _ = time_kernels({
                        name: functools.partial(training_products, sample, weight, grad_output, name == "onednn")
                        for name in ("onednn", "aten")
                    })  # fmt: skip
                    kernel = min(seconds, key=seconds.get)
                except RuntimeError:  # a shape oneDNN refuses
                    kernel = "aten"
            choices[key] = kernel
        return kernel

    def inference_forward(
        self, input: torch.Tensor, activation: str = "none", into_scratch: bool = False, chosen: str | None = None
    ) -> torch.Tensor:
        """activation(input @ weight.T + bias) on the kernel `self.kernel` gives, where may_run_onednn(input);
        `into_scratch`: where that kernel is nn.Linear's, the output in a scratch buffer (see aten_linear); `chosen`:
        the kernel "auto" chose for this call, where the caller has looked it up already (recorded_kernel)."""
        weight, bias = self.weight_and_bias()
        packed = self.kernel in PACKED_KERNELS
        if self.kernel.startswith("auto"):
            if torch.compiler.is_compiling():
                kernel, output = self.compiled_choice(input, activation, packed), None
            elif chosen is not None:
                kernel, output = chosen, None
            else:
                kernel, output = self.timed_kernel(input, activation, packed)
            if output is not None:
                return output
            if kernel == "aten":
                return aten_linear(input, weight, bias, activation, into_scratch)
        if torch.compiler.is_compiling():
            # torch.compile cannot trace oneDNN's packed tensors; the op of its own stays opaque in the graph.
            return torch.ops.selfattn.onednn_linear(input, weight, bias, activation, packed)
        # The same function without the op's dispatch, which costs 4-7 us a call outside compile (measured).
        return onednn_linear(input, weight, bias, activation, packed)

    def takes_onednn_untimed(self, rows: int) -> bool:
        """A streamed weight's call of 4-7 rows, which timing cannot judge (see ONEDNN_STREAMED_MIN_ROWS)."""
        return (
            ONEDNN_STREAMED_MIN_ROWS <= rows < ONEDNN_MIN_ROWS
            and self.in_features * self.out_features >= STREAMED_WEIGHT_ELEMENTS
        )

    def timing_key(self, rows: int, activation: str, packed: bool) -> tuple:
        # Streamed calls (untimed) get a key of their own, apart from the 8-row bucket that rows 5-7 round up to.
        bucket = "streamed" if self.takes_onednn_untimed(rows) else row_bucket(rows)
        return self.in_features, self.out_features, activation, bucket, packed

    def compiled_choice(self, input: torch.Tensor, activation: str, packed: bool) -> str:
        """A trace cannot time: it takes the choice eager calls made; where there is none yet, oneDNN from
        ONEDNN_MIN_ROWS rows (and on a streamed weight), nn.Linear's kernel on fewer."""
        rows = input.numel() // self.in_features
        if not isinstance(rows, int):  # a dynamic shape: no row count to look up
            return "onednn"
        chosen = _chosen_kernels.get(_eager_threads[0], {}).get(self.timing_key(rows, activation, packed))
        if chosen is not None:
            return chosen
        return "onednn" if rows >= ONEDNN_MIN_ROWS or self.takes_onednn_untimed(rows) else "aten"

    def timed_kernel(self, input: torch.Tensor, activation: str, packed: bool) -> tuple[str, torch.Tensor | None]:
        """The kernel chosen for this call's shape, timing both on this call (and then with its output) if none was
        chosen yet in this process. A shape oneDNN refuses is left to nn.Linear's kernel."""
        choices = eager_choices()
        rows = input.numel() // self.in_features
        key = self.timing_key(rows, activation, packed)
        kernel = choices.get(key)
        if kernel is not None:
            return kernel, None
        weight, bias = self.weight, self.bias
        try:
            if key[3] == "streamed":
                kernel, output = "onednn", onednn_linear(input, weight, bias, activation, packed)
            else:
                seconds, outputs = time_kernels({
                    "onednn": lambda: onednn_linear(input, weight, bias, activation, packed),
                    "aten": lambda: aten_linear(input, weight, bias, activation),
                })  # fmt: skip
                kernel = min(seconds, key=seconds.get)
                output = outputs[kernel]
        except RuntimeError:  # a shape oneDNN refuses
            choices[key] = "aten"
            return "aten", None
        choices[key] = kernel
        return kernel, output


# The activations oneDNN applies in the product's own pass, with results equal to torch's (measured: identical bits).
ONEDNN_ACTIVATIONS = {GELUActivation: "gelu", nn.ReLU: "relu"}


def unobserved(module: nn.Module) -> bool:
    """No forward hook (the module's or a global one) and no forward replaced on the instance (as capture tools do):
    nothing but the module's own forward sees its inputs and outputs. A forward on the instance that is the class's
    own, bound to it, replaces nothing: the `kernels` library's kernelize sets that on each layer it finds no kernel
    for (transformers' GELUActivation on a CPU, say), and transformers' from_pretrained runs kernelize by default
    from 5.25 on."""
    forward = module.__dict__.get("forward")
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
        or (forward is not None and not binds_the_class_forward(module, forward))
    )


def binds_the_class_forward(module: nn.Module, forward) -> bool:
    return (
        isinstance(forward, types.MethodType)
        and forward.__self__ is module
        and forward.__func__ is type(module).forward
    )


def activation_name(activation: nn.Module) -> str | None:
    """"gelu" or "relu" where `activation` is torch's own (GELUActivation on torch's gelu, not its Python formula, or
    nn.ReLU), else None."""
    name = ONEDNN_ACTIVATIONS.get(type(activation))
    if name == "gelu" and activation.act is not nn.functional.gelu:
        return None
    return name


def reads_and_drops(consumers: tuple[nn.Module, ...]) -> bool:
    """Whether a tensor that goes through `consumers` in turn (and nowhere else) is only read there: each is a
    selfattn Linear or a dropout in evaluation (which returns its input), no hook observes any of them, and autograd
    keeps nothing (a Linear whose weight trains would save its input for the weight's gradient)."""
    return all(
        unobserved(module)
        and (type(module) is Linear or (isinstance(module, nn.Dropout) and not module.training))
        and not (torch.is_grad_enabled() and any(parameter.requires_grad for parameter in module.parameters()))
        for module in consumers
    )


def linear_then_activation(
    linear: nn.Module, activation: nn.Module, input: torch.Tensor, consumers: tuple[nn.Module, ...] = ()
) -> torch.Tensor:
    """activation(linear(input)): as one oneDNN call where `linear` may run oneDNN, the activation is torch's own
    (activation_name) and no hook observes either module; else the activation applied in place on the product where
    that is safe (no gradient, no hook, no autocast, not tracing or exporting, and a product that is a fresh tensor: an
    nn.Linear's, or a layer's that says so with `fresh_output`, as model.quantize's int8 layers do). In place spares
    an allocation of the product's size, which on a 2-core Xeon VM cost more than the activation (measured: gelu on
    1570x1536 floats 0.65 ms alone, 2.9 ms a call within the int8 encoder). A wrapped layer (LoRA, a quantised one)
    is not a selfattn Linear and runs as it is. `consumers`: the modules the result goes through next, and nowhere
    else (the feed-forward's dropout and fc2); where they only read it (reads_and_drops) and the product is
    nn.Linear's kernel's, it goes into a per-thread scratch buffer (see aten_linear), sparing the fresh tensor."""
    name = activation_name(activation)
    observed = not (unobserved(linear) and unobserved(activation))
    if type(linear) is Linear and linear.may_run_onednn(input) and name is not None and not observed:
        into_scratch = bool(consumers) and reads_and_drops(consumers) and may_write_into_scratch(input)
        return linear.inference_forward(input, name, into_scratch=into_scratch)
    output = linear(input)
    if (
        name is None
        or observed
        or output.requires_grad
        or not (isinstance(linear, nn.Linear) or getattr(linear, "fresh_output", False))
        or torch.is_autocast_enabled(output.device.type)  # autocast may give the activation another dtype
        or torch.jit.is_tracing()
        or torch.compiler.is_exporting()
    ):
        return activation(output)
    return ATEN_ACTIVATIONS[name](output)


# The intermediate (fc1's output) of one block of rows in a feed-forward that runs by blocks (rows_per_block): 3 MB,
# 512 rows of a 1536-wide intermediate, whose passes the two cores of this project's VM share, each within its 2 MB
# L2 cache. Blocks of 256 to 1,024 such rows measured alike (13-19% less time than one call, within the noise).
ROW_BLOCK_BYTES = 3 * 2**20


def rows_per_block(
    fc1: nn.Module, modules: tuple[nn.Module, ...], input: torch.Tensor, chunk_size: int = 0
) -> int | None:
    """The rows of `input` that a feed-forward (fc1, then `modules`: its activation, dropout and fc2) should take at
    a time, as runs of consecutive rows of the input flattened to (rows, width) (in_row_blocks), or None for all at
    once. In eager mode only: a trace would keep the traced input's blocks for every input. The smaller of:

    - `chunk_size` > 0 (transformers' config.chunk_size_feed_forward; BERT chunks when it is positive): that many
      positions of each row of the batch, to bound the intermediate's memory. The encoder's unpadded batches are one
      row of packed tokens: there, that many tokens. Results equal one call's to float32 rounding (a kernel may
      round a row otherwise in a smaller product); a dropout in training draws its mask a block at a time.
    - For speed: blocks of ROW_BLOCK_BYTES of intermediate where both linears compute each row alone, to the bit
      (`rows_alone`: model.quantize's int8 layers with per-token activations), with no dropout in training and no
      hook on any of the four modules. The results are those of one call; each block's intermediate stays in
      cache, where one of every row would be a fresh tensor that fc1's kernel, its per-token epilogue, the
      activation and fc2's per-token passes each go through in memory. Measured in one process, alternating
      against one call (int8 all-MiniLM-L6-v2, 2-core Xeon VM, identical outputs): the encoder took 9.4-22.5% less
      time on 64 SST-2 sentences (1,570 tokens; five runs, e.g. 152.5 -> 124.8 ms), 15.9% on 32x128 tokens and
      12.8% on 64 skewed padded sentences; on the SST-2 sentences fc1's calls had met 18,400-19,500 page faults a
      forward (none in blocks). Float32 layers take every row at once: their kernels may round a row otherwise in
      a smaller product, and blocks ran 2-4% slower there."""
    rows_alone = getattr(fc1, "rows_alone", False) and getattr(modules[-1], "rows_alone", False)
    if not (chunk_size > 0 or rows_alone):  # the float32 model's case, first: it runs at every call
        return None
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return None
    total = input.shape[:-1].numel()
    candidates = [chunk_size * input.shape[:-2].numel()] if chunk_size > 0 else []
    if (
        rows_alone
        and not any(isinstance(module, nn.Dropout) and module.training for module in modules)
        and all(unobserved(module) for module in (fc1, *modules))
    ):
        rows = max(ROW_BLOCK_BYTES // (4 * fc1.out_features), 1)
        candidates.append(math.ceil(total / math.ceil(total / rows)))  # blocks of even size
    rows = min(candidates, default=total)
    return rows if rows < total else None


def in_row_blocks(position_wise: Callable, input: torch.Tensor, rows: int) -> torch.Tensor:
    """`position_wise` (rows of `input` -> rows of outputs) applied `rows` rows at a time, the blocks' outputs joined
    (torch.cat: under autograd, vmap and tensor subclasses alike)."""
    inputs = input.reshape(-1, input.shape[-1])
    output = torch.cat([position_wise(block) for block in inputs.split(rows)])
    return output.view(*input.shape[:-1], output.shape[-1])


def set_linear_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Choose the kernel of every selfattn Linear in `model` (returned) for CPU float32 inference on x86: "auto" (the
    default: the faster of oneDNN and nn.Linear's own, timed once per shape), "auto-packed" (the same with oneDNN on
    packed copies of the weights: more memory, a second copy of each weight used), "onednn" (oneDNN), "onednn-packed"
    (oneDNN on packed copies) or "aten" (nn.Linear's own). Drops the packed copies made so far of the model's
    weights: with a packed kernel, an edit of the weights that bypasses autograd (`weight.data`, PEFT's merge) is
    seen only after this call (or drop_changed_packed_weights)."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {LINEAR_KERNELS}.")
    if kernel.startswith("onednn") and not ONEDNN_AVAILABLE:
        raise RuntimeError(
            f"kernel={kernel!r} runs on x86 CPUs with a torch build that has oneDNN (mkldnn); this machine or build is "
            "not one. Use 'auto', 'auto-packed' or 'aten'."
        )
    layers = [module for module in model.modules() if isinstance(module, Linear)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no selfattn Linear layer (modeling_selfattn.kernels.Linear), so "
            f"kernel={kernel!r} would change nothing: pass a selfattn model (or layer) whose linear layers are not "
            "all int8-quantized."
        )
    for module in layers:
        module.kernel = kernel
        _onednn_packed_weights.pop(module.weight.untyped_storage(), None)
    return model
