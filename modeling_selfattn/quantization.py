"""int8 and bf16 inference in one call: `model.quantize("int8")` or `model.quantize("bf16")` (the method of
SelfAttnPreTrainedModel delegates here). Both change the model in place and return it.

- "int8": every linear layer (any nn.Linear, subclasses included) but those `keep_float32` names (by default the
  encoder's value projections) and those with an empty weight (an attention's with every head pruned) becomes
  torch's dynamically quantized linear (torch.ao.nn.quantized.dynamic.Linear): int8 weights with one symmetric scale
  per output channel; activations quantized on the fly at each call; int8 products summed in int32; float32 in and
  out. CPU only. Embeddings and LayerNorms stay float32; a projection that shares the token table (the tied LM head)
  gets its own int8 copy and the table itself stays float32; a generating head's final_logits_bias moves into its
  int8 LM head (logits_biases_to_fold). A quantize("int8") that fails leaves the model as it was. Inference only:
  training mode, gradients, save_pretrained and push_to_hub are refused with an error that says what to do instead,
  and so are a dtype change (to(torch.bfloat16), half(): apply_to_quantized) and resizing an int8 LM head
  (refuse_resizing_int8_lm_head).
- "bf16": every floating parameter and buffer in bfloat16, LayerNorms included, on any device; generate(), training
  and save_pretrained work as for any bfloat16 model.

Activations, two ways:
- one scale and zero point for the whole input tensor (Int8DynamicLinear), the fastest;
- one step and offset per row, i.e. per token (Int8RowScaledLinear), for the layers `per_token_activations` names.
The products run on torch's fbgemm kernels, or on its oneDNN ones where the CPU has AMX for int8 (ONEDNN_INT8):
there the per-token layers take oneDNN on every call, the per-tensor ones from ONEDNN_INT8_MIN_ROWS rows (a large
weight, an LM head, from ONEDNN_INT8_LARGE_WEIGHT_MIN_ROWS).

Attention, with "int8": in bfloat16 where the CPU has bfloat16 dot products (AVX512-BF16 or AMX,
computes_bf16_natively), or as `bf16_attention` says. Queries, keys and values go to bfloat16 after their projections
(SelfAttnAttention.attention_dtype), so that the attention's products and the key/value cache run in it; the
attention's output comes back to float32 for o_proj, as do attention maps. Why: a decoding step reads the whole
cache and the cross-attention's keys and values, mostly from memory, and bfloat16 halves those bytes. Measured on a
2-core Xeon with AMX: torch's SDPA over a batch-16 step's cross-attention (Transformer-base, 64 keys) took 85 us in
bfloat16 against 280 us in float32 with keys and values out of cache (48 against 89 us in cache); in int8 greedy
decoding at batch 16 (64 new tokens, profiled) SDPA took 101-102 ms of a generate() against 163-169 ms, the casts
7-20 ms more. In one process, alternating, that decoding took 12-13%, 6% and 1.4% less time in three runs (the VM
slowing through the session; the last run's rounds spread over 0.70-0.96 s), the same tokens; at batch 1 and with
4 beams the same time within noise; the int8 MiniLM encoder 11-13% less on 32x128 tokens and 8-12% less on 64 skewed
padded sentences (two runs), its lowest mean-pooled cosine to float32 0.9977 either way on 32x128 (0.9972 against
0.9975 on the skewed batch). Quality on real models and data: README, "int8 and bf16 inference".

By default (None for both arguments), inside each encoder stack the value projections stay float32 and fc1 and fc2
scale their activations per token; every other linear layer (the decoder's, the heads') is int8 with one scale per
tensor. Why: the inputs of fc1 and fc2 hold a few tokens far larger than the rest (all-MiniLM-L6-v2: fc2's GELU
outputs reach 25 in the first layer where a channel's typical maximum is 1.4; fc1's LayerNorm outputs reach 28 in
one channel, in some tokens), so one scale for the tensor leaves the other tokens few levels. The value projections'
error, which passes to the output undamped by the softmax, stayed the largest left with every layer per token, so
they stay float32 (measured, below; they are a twelfth of the encoder's products). Measured with
benchmarks/quantized_quality.py on all 872 SST-2 dev sentences (batches of 64): the lowest cosine of
all-MiniLM-L6-v2's mean-pooled embeddings to float32's is 0.966 with every layer int8 per tensor, 0.974 with the
value projections in float32 alone, 0.990 with fc1 and fc2 per token alone, 0.994 with every layer per token,
0.9956-0.9958 with these defaults (mean 0.9991; attention in float32, 0.9955 with it in bfloat16, above). They
cost the encoder 6-36% of its int8 time on this project's noisy VM (10-20% in most runs); 8-9% (64 SST-2
sentences, 32x128 tokens, one run) since the feed-forward gives its per-token layers a block of rows at a time
(kernels.rows_per_block). Decoding gains nothing measurable from
them (Multi30k BLEU and token agreement with float32 equal either way) and would pay 28% a step, so decoders keep
per tensor. A row's result in a per-token layer does not depend on the other rows of its batch (to the bit on this
project's Xeon).

Why torch's dynamic quantization rather than torchao's Int8DynamicActivationInt8WeightConfig (per-token activations):
on CPU without torch.compile, torchao's int8 linears ran 5x slower than float32 (its CPU path is written for Inductor
to fuse), torch's 2.4x faster (MiniLM-sized linears, 32x128 tokens, 2-core Xeon with AVX512-VNNI). torch 2.13
deprecates the quantized dtypes (torch.qint8) this builds on (pytorch/pytorch#184982); the warning it gives at every
quantization is silenced here, as the user cannot act on it.

Shipped with saved models (model.py imports it), so it imports nothing of the package but kernels.py, scratch.py and
argument_values.py (for its `shown`), also shipped.
"""

import collections
import collections.abc
import fnmatch
import functools
import math
import os
import re
import warnings
import weakref
import zlib

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from torch.ao.quantization import per_channel_dynamic_qconfig

from .argument_values import shown
from .kernels import ONEDNN_AVAILABLE, define_operator
from .scratch import may_write_into_scratch, scratch

QUANTIZATION_MODES = ("int8", "bf16")

LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic
LINEAR_ROW_SCALED = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32

# The argument types of a call whose tensors are plain and whose packed weights are real: nothing in it can have a
# __torch_function__ of its own (call_on_packed_weights).
PLAIN_ARGUMENT_TYPES = frozenset({torch.Tensor, torch.ScriptObject, bool, int, float})
NO_SUBCLASS_TORCH_FUNCTION = torch._C.DisableTorchFunctionSubclass


def call_on_packed_weights(operator: torch._ops.OpOverloadPacket, *arguments):
    """`operator(*arguments)`, one of the arguments being a layer's packed weights (a ScriptObject).

    Why not the plain call: torch first asks every argument for __torch_function__, and a ScriptObject answers by
    throwing and catching a C++ exception, about 10 us a call on the Xeon measured, more than fbgemm's kernel takes
    on a decoding step's one row (8 us); and the packet's Python call scans the arguments for the fake script objects
    of tracing. Where every argument is a plain tensor, real packed weights or a number, no argument has a
    __torch_function__ of its own, so the operator's function is called directly with subclasses' __torch_function__
    off. Torch function and dispatch modes still see the call (their handlers then run with subclasses'
    __torch_function__ off too). Anything else (a tensor subclass, tracing's fake script objects) takes the packet's
    call."""
    if all(type(argument) in PLAIN_ARGUMENT_TYPES for argument in arguments):
        with NO_SUBCLASS_TORCH_FUNCTION():
            return getattr(operator, "_op", operator)(*arguments)
    return operator(*arguments)


# torch 2.13's deprecation of its quantized dtypes (see the module docstring), matched exactly: nothing else is hidden.
QUANTIZED_DTYPE_DEPRECATION = r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor"

# The defaults of quantize()'s keep_float32 and per_token_activations (see the module docstring), as fnmatch patterns of
# module names within each encoder stack (SelfAttnEncoder): its value projections stay float32; its feed-forward's two
# linears scale their activations per row.
KEEP_FLOAT32_DEFAULT = ("layers.*.v_proj",)
PER_TOKEN_DEFAULT = ("layers.*.fc1", "layers.*.fc2")


def within_encoders(model: nn.Module, patterns: tuple[str, ...]) -> tuple[str, ...]:
    """`patterns` (relative to an encoder stack) as patterns of `model`'s own module names, for each encoder stack in
    it: the model itself, or `encoder`, `model.encoder`... The stacks are found by class name, as this file imports
    nothing of the package."""
    stacks = [
        name
        for name, module in model.named_modules()
        if any(cls.__name__ == "SelfAttnEncoder" for cls in type(module).__mro__)
    ]
    return tuple(f"{stack}.{pattern}" if stack else pattern for stack in stacks for pattern in patterns)


def int8_activations_use_full_range(capabilities: dict | None = None) -> bool:
    """Whether this CPU's int8 kernels (`capabilities`: torch.cpu.get_capabilities(), this CPU's where None) can take
    activations over the full 8 bits (0..255). Without VNNI, fbgemm sums
    pairs of uint8 x int8 products in int16, which saturates unless activations are reduced to 7 bits (torch's
    default for dynamic quantization, reduce_range=True). With AVX512-VNNI the products are summed in int32 and the
    eighth bit is free, and worth having: it raised the SST-2 dev accuracy of an int8 MiniLM classifier from 0.69 to
    0.11 points below float32, and the lowest cosine of all-MiniLM-L6-v2's sentence embeddings to float32's from 0.932
    to 0.971 (256 sentences in one batch)."""
    capabilities = torch.cpu.get_capabilities() if capabilities is None else capabilities
    return bool(capabilities.get("avx512_vnni") or capabilities.get("amx_int8"))


# oneDNN's int8 products (torch.ops.onednn, the kernels torch.compile's x86 int8 lowering calls) where the CPU has AMX
# tiles for int8, which fbgemm does not use. Measured on a 2-core Xeon with AMX (one process, alternating, per layer):
# per-token layers (below) took 0.5-0.9x fbgemm's time over a block of the encoder's tokens; per-tensor ones
# 0.5-0.7x on products into a wider output (384 -> 1536, 512 -> 2048, 512 -> 32,000) from 1,024 rows, 0.8-1.0x on
# square ones, 0.85-1.15x into a narrower one, and up to 4x more on a decoding step's few rows (oneDNN's cost per
# call and the passes that quantize the activations). The activations go to oneDNN as int8, which torch converts
# float32 to several times faster than to uint8; without AMX, oneDNN has no fast kernel for int8 activations (one
# product took 3.2 s with oneDNN held to AVX512-VNNI, ONEDNN_MAX_CPU_ISA), so such CPUs, and a oneDNN held below
# AMX by that setting, keep fbgemm.
# None where torch was built without oneDNN's int8 kernels.
ONEDNN_QLINEAR = getattr(torch.ops.onednn, "qlinear_pointwise", None)


def onednn_reaches(environment: collections.abc.Mapping, instruction_sets: tuple[str, ...]) -> bool:
    """Whether oneDNN may use one of `instruction_sets` (names as oneDNN spells them, or parts of them): each limit
    it is held to (`environment`: its ONEDNN_MAX_CPU_ISA, or the older DNNL_MAX_CPU_ISA) is unset or ALL, or names
    one of them."""
    limits = [environment.get(name, "ALL").upper() for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")]
    return all(limit == "ALL" or any(isa in limit for isa in instruction_sets) for limit in limits)


def onednn_int8_is_fast(capabilities: dict, environment: collections.abc.Mapping) -> bool:
    """Whether oneDNN's int8 products run on AMX: the CPU has AMX for int8 (`capabilities`:
    torch.cpu.get_capabilities()) and oneDNN is not held below it (onednn_reaches)."""
    return bool(capabilities.get("amx_int8")) and onednn_reaches(environment, ("AMX",))


def onednn_int8_is_exact(capabilities: dict, environment: collections.abc.Mapping) -> bool:
    """Whether oneDNN may be sent int8 activations at all (a layer forced onto it off AMX): it summed them in int32
    with AVX512 (VNNI or not) and AMX, but saturated with AVX2 (7-bit rows, or a zero point of 0), measured with
    ONEDNN_MAX_CPU_ISA on a Xeon. So: a CPU with AVX512-VNNI or AMX, oneDNN not held below AVX512."""
    return int8_activations_use_full_range(capabilities) and onednn_reaches(environment, ("AVX512", "AVX10", "AMX"))


def computes_bf16_natively(
    capabilities: dict | None = None, environment: collections.abc.Mapping | None = None
) -> bool:
    """Whether this CPU (`capabilities`: torch.cpu.get_capabilities(), this CPU's where None) has bfloat16 dot
    products (AVX512-BF16, or AMX tiles for bf16) and oneDNN, whose kernels torch's bfloat16 products run on, is
    available, enabled and not held below them (`environment`: os.environ where None; see onednn_reaches): where
    int8 models run attention in bfloat16 (see the module docstring)."""
    capabilities = torch.cpu.get_capabilities() if capabilities is None else capabilities
    return (
        bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
        and torch.backends.mkldnn.is_available()
        and bool(torch.backends.mkldnn.enabled)
        and onednn_reaches(os.environ if environment is None else environment, ("BF16", "FP16", "AMX", "AVX10"))
    )


_capabilities = torch.cpu.get_capabilities()
ONEDNN_INT8 = ONEDNN_AVAILABLE and ONEDNN_QLINEAR is not None and onednn_int8_is_fast(_capabilities, os.environ)
# Elsewhere a layer forced onto oneDNN refuses (see onednn_int8_is_exact).
ONEDNN_INT8_EXACT = ONEDNN_QLINEAR is not None and onednn_int8_is_exact(_capabilities, os.environ)
# Per-tensor layers take oneDNN from this many rows (tokens): the encoder's products over a batch's tokens, not a
# decoding step's few rows...
ONEDNN_INT8_MIN_ROWS = 1024
# ...except a weight of at least ONEDNN_INT8_LARGE_WEIGHT values (an LM head), from ONEDNN_INT8_LARGE_WEIGHT_MIN_ROWS
# rows: a decoding step reads it from memory, where oneDNN's AMX kernels gain more than its cost a call (about 50 us,
# with the passes that quantize the activations). Measured on a 2-core Xeon with AMX, Transformer-base's 32,000x512
# LM head alone: oneDNN 1.22x as fast as fbgemm at 16 rows, 2.35x at 64, 0.70-0.76x at 1-4; greedy decoding at batch
# 16 (int8, one process, alternating): 1.8% and 2.7% less time in two runs, the same tokens. The decoder's 512x2048
# weights (1M values) were 0.44x at 16 rows and 0.87x at 64, and gained only from 128.
ONEDNN_INT8_LARGE_WEIGHT = 8 * 2**20
ONEDNN_INT8_LARGE_WEIGHT_MIN_ROWS = 16


# The narrowest range a per-token row is given: levels (255) / MIN_ROW_WIDTH stays a finite float32.
MIN_ROW_WIDTH = 256 / torch.finfo(torch.float32).max


def rows_times(x: torch.Tensor, rows: torch.Tensor, factor) -> torch.Tensor:
    """`rows` (float32, `x` flattened to rows) times `factor`, for the int8 layers to quantize: in this thread's
    scratch buffer where `x` allows it (scratch.py), as into a fresh tensor this pass took up to 3.5x as long on fc2's
    input (page faults); read once, by the kernel, before the next such call."""
    if not may_write_into_scratch(x):
        return rows.mul(factor)
    return torch.mul(rows, factor, out=scratch("int8 rows", rows.numel(), torch.float32).view(rows.shape))


class OneDNNWeight:
    """A layer's int8 weight as oneDNN reads it, packed at the layer's first oneDNN call and kept with the fbgemm
    packet it was made from, so that new weights (load_state_dict, set_weight_bias) are packed again. oneDNN's packed
    weight is an opaque tensor, which neither deepcopy nor pickling can copy: copies start empty and pack again."""

    __slots__ = ("source", "weight", "scales", "zero_points", "bias")

    def __init__(self):
        self.source = None

    def __deepcopy__(self, memo):
        return OneDNNWeight()

    def __reduce__(self):
        return (OneDNNWeight, ())

    def packed_from(self, packed: torch.ScriptObject) -> "OneDNNWeight":
        if self.source is not packed:
            with torch._C._DisableFuncTorch():  # under vmap too: the weights are not batched
                weight, bias = torch.ops.quantized.linear_unpack(packed)
            self.weight = torch.ops.onednn.qlinear_prepack(weight.int_repr(), None)
            self.scales = weight.q_per_channel_scales().float()
            self.zero_points = weight.q_per_channel_zero_points()
            self.bias = bias
            self.source = packed
        return self

    def product(self, quantized: torch.Tensor, scale: float, zero_point: int, bias: torch.Tensor | None):
        """`quantized` (int8 rows: each x is scale * (q - zero_point)) times the weight, plus `bias`, in float32."""
        return ONEDNN_QLINEAR(
            quantized, scale, zero_point, self.weight, self.scales, self.zero_points, bias, 1.0, 0, torch.float32,
            "none", [], "",
        )


# Inside a compiled graph (compiled decoding, fast_paths.py) each int8 layer is one opaque operator, as torch.compile
# cannot take its packed weights (a ScriptObject) into a graph: the operator finds the layer by its id in INT8_LAYERS,
# which every int8 layer joins when made, copied or unpickled, and runs the layer's eager forward, so the graph's
# products are what the eager layer gives the same input. One operator per copy of this file (the package's, a saved
# model's remote code), named after the module (its name made an identifier, with a hash against clashes), so that
# each finds its own layers. A module executed again (importlib.reload) keeps its registry.
INT8_LAYERS: "weakref.WeakValueDictionary[int, Int8DynamicLinear]"
if globals().get("INT8_LAYERS") is None:
    INT8_LAYERS = weakref.WeakValueDictionary()
INT8_LAYER_OPERATOR = f"int8_linear_{re.sub(r'[^0-9A-Za-z_]', '_', __name__)}_{zlib.crc32(__name__.encode()):08x}"


def int8_layer_forward(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    found = INT8_LAYERS.get(layer)
    if found is None:
        raise RuntimeError(
            f"torch.ops.selfattn.{INT8_LAYER_OPERATOR}: no int8 layer with id {layer} is alive in this process. A "
            "compiled graph calls this operator with the ids of the int8 layers it was traced from; run it on the "
            "model it was compiled for (enable_compiled_decoding compiles each model's, and each copy's, own)."
        )
    return found.eager_forward(x)  # never the operator again: a compile in another thread must not make it recurse


def int8_layer_output(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


define_operator(INT8_LAYER_OPERATOR, "Tensor x, int layer, int out_features", int8_layer_forward, int8_layer_output)


def in_compiled_graph() -> bool:
    """Being traced by Dynamo (torch.compile) into a graph that runs here, not exported. is_dynamo_compiling, not
    is_compiling: the latter reads a flag of the whole process, true in every thread while any thread compiles."""
    return torch.compiler.is_dynamo_compiling() and not torch.compiler.is_exporting()


class Int8DynamicLinear(DynamicQuantizedLinear):
    """torch's dynamically quantized linear (int8 weights with per-channel scales, activations quantized per call
    with one scale per tensor) that refuses to run where its output would be wrong without saying so: its kernel has
    no backward (autograd passes no gradient through it, so a backward pass would silently leave the layers below
    unchanged), and its packed weights live on the CPU. `reduce_range`: activations on 7 bits rather than 8 (see
    int8_activations_use_full_range)."""

    reduce_range = True
    # Each call returns a tensor of its own, which the feed-forward's activation may then overwrite in place
    # (kernels.linear_then_activation).
    fresh_output = True
    # Calls with at least this many rows take oneDNN (ONEDNN_INT8_MIN_ROWS where ONEDNN_INT8 holds; a large weight
    # from ONEDNN_INT8_LARGE_WEIGHT_MIN_ROWS rows if that is fewer); None: fbgemm always. Set on a layer (or the
    # class) to force either kernel; off AMX oneDNN is slow (and refused without AVX512-VNNI: ONEDNN_INT8_EXACT), for
    # tests.
    onednn_min_rows = ONEDNN_INT8_MIN_ROWS if ONEDNN_INT8 else None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.onednn_weight = OneDNNWeight()
        INT8_LAYERS[id(self)] = self

    def __setstate__(self, state):  # copy.deepcopy and unpickling (torch.load of a whole model)
        super().__setstate__(state)
        INT8_LAYERS[id(self)] = self

    def in_graph(self, x: torch.Tensor) -> torch.Tensor:
        """This layer's call as one operator of a compiled graph (see INT8_LAYERS), which has no backward: the
        refusals of check_input hold here too, when traced."""
        if x.requires_grad or not x.is_cpu:
            self.check_input(x)
        return getattr(torch.ops.selfattn, INT8_LAYER_OPERATOR)(x, id(self), self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if in_compiled_graph():
            return self.in_graph(x)
        return self.eager_forward(x)

    def check_input(self, x: torch.Tensor) -> None:
        # Int8DynamicLinear.forward calls this only for an input that requires a gradient or is off the CPU (its
        # quick test, as a decoding step makes dozens of one-row calls); the row-scaled layer on every call.
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "An int8 layer (model.quantize('int8')) got an input that requires a gradient. int8 models are for "
                "inference only: torch's quantized linear kernels have no backward, so no gradient would pass through "
                "them. Run inference under torch.no_grad() with inputs that do not require a gradient, or "
                "fine-tune the float32 model and quantize it afterwards."
            )
        if not x.is_cpu:
            raise RuntimeError(
                f"An int8 layer (model.quantize('int8')) got an input on {x.device}, but int8 dynamic quantization "
                "runs on CPU only. Run the int8 model on CPU inputs, or use model.quantize('bf16') on a GPU."
            )

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Lean, as a decoding step makes dozens of one-row calls: check_input only where it may refuse, the packed
        # weights read through _modules (as nn.Module's attribute lookup would, for less) and the operator called
        # through call_on_packed_weights. Against check_input on every call and those lookups: 1.1% and 5.8% less
        # time in int8 greedy decoding at batch 1 (Transformer-base, two runs, one process, alternating).
        if x.requires_grad or not x.is_cpu:
            self.check_input(x)
        packed = self._modules["_packed_params"]._packed_params
        if x.dtype == torch.float32 and self.takes_onednn(x.numel() // self.in_features):
            output = self.onednn_product(x, packed)
        else:
            output = call_on_packed_weights(LINEAR_DYNAMIC, x, packed, self.reduce_range)
        return output if output.dtype == x.dtype else output.to(x.dtype)

    def takes_onednn(self, rows: int) -> bool:
        """Whether a call of `rows` rows takes oneDNN: from onednn_min_rows rows (fewer for a large weight, see
        ONEDNN_INT8_LARGE_WEIGHT), in eager mode, outside torch.func transforms and dispatch modes (a trace or a
        compiled graph could not hold oneDNN's packed weight, an opaque tensor; the per-tensor path reads the
        activations' range as numbers). Elsewhere fbgemm."""
        # The row count after tracing (where it would be a traced value) and compiling (a guard), before the rest: a
        # decoding step's one-row calls stop there.
        min_rows = self.onednn_min_rows
        if min_rows is not None and self.in_features * self.out_features >= ONEDNN_INT8_LARGE_WEIGHT:
            min_rows = min(min_rows, ONEDNN_INT8_LARGE_WEIGHT_MIN_ROWS)
        if (
            min_rows is None
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
            or rows < min_rows
            or torch.compiler.is_exporting()
            or torch._C._functorch.peek_interpreter_stack() is not None
            or torch._C._len_torch_dispatch_stack() > 0
        ):
            return False
        if not ONEDNN_INT8_EXACT:
            raise RuntimeError(
                f"onednn_min_rows={self.onednn_min_rows} sends this int8 layer to oneDNN, whose int8 kernels can "
                "saturate, giving wrong results, on a CPU without AVX512-VNNI or AMX or with oneDNN held below AVX512 "
                "(ONEDNN_MAX_CPU_ISA or DNNL_MAX_CPU_ISA), as here. Set onednn_min_rows = None on the layer (fbgemm, "
                "the default here)."
            )
        return True

    def onednn_product(self, x: torch.Tensor, packed: torch.ScriptObject) -> torch.Tensor:
        """What fbgemm's dynamic linear computes, by oneDNN, for float32 `x`: activations on 8 bits (oneDNN sums in
        int32 on the CPUs it may run on here, whatever reduce_range) with one scale and zero point for the tensor
        (its range, widened to hold 0), rounded to the nearest step; int8 products summed in int32. The steps go to
        oneDNN as int8 (0..255 less 128, the zero point with them), as torch converts float32 to int8 several times
        faster than to uint8."""
        rows = x.reshape(-1, x.shape[-1])
        low, high = (bound.item() for bound in torch.aminmax(rows))
        if not (math.isfinite(low) and math.isfinite(high)):  # no grid holds them: fbgemm's output, as elsewhere
            return call_on_packed_weights(LINEAR_DYNAMIC, x, packed, self.reduce_range)
        weight = self.onednn_weight.packed_from(packed)
        low, high = min(low, 0.0), max(high, 0.0)
        scale = max((high - low) / 255, torch.finfo(torch.float32).tiny)
        zero_point = min(max(round(-low / scale), 0), 255) - 128
        steps = rows_times(x, rows, 1 / scale)
        quantized = steps.add_(zero_point).round_().clamp_(-128, 127).to(torch.int8)
        output = weight.product(quantized, scale, zero_point, weight.bias)
        return output.view(*x.shape[:-1], output.shape[-1])


class Int8RowScaledLinear(Int8DynamicLinear):
    """Int8DynamicLinear whose activations get one step and offset per row (token) rather than one for the tensor:
    each row x is first mapped onto [0, levels] by its own range [low, high] (low = min(x, 0), high = max(x, 0);
    levels 255, or 127 where fbgemm needs 7 bits), then rounded to integers (by fbgemm's
    linear_with_input_q_dq_qweight_dq_output_fp32 with scale 1 and zero point 0, or here for oneDNN), so each row's
    steps are its own range's; then
        x @ W.T + bias = (high - low) / levels * (x0L @ W.T) + low * W.sum(1) + bias,
    with W the int8 weight dequantized (packed without the bias, which is added here in float32). Every input takes
    this one path, a single row too, so that a row's result is the same in any batch."""

    # Each row's result is the same whatever other rows come with it (to the bit, as above): a feed-forward may feed
    # these layers a block of rows at a time (kernels.rows_per_block).
    rows_alone = True
    # One kernel for every call, whatever its rows: oneDNN where ONEDNN_INT8 holds (1), else fbgemm (None). The two
    # gave the same bits on the Xeon measured (see forward), but nothing promises it on every CPU, and a row's result
    # must stay the same in any batch. The cost: below 64-128 rows oneDNN took 1.1-1.4x fbgemm's time a call (about
    # 40 us more; 384 -> 1536 and 1536 -> 384, AMX Xeon), some 0.5 ms a forward of a few tokens through MiniLM.
    onednn_min_rows = 1 if ONEDNN_INT8 else None

    def prepare_row_scaling(self, bias: torch.Tensor | None) -> None:
        """`bias`: the float layer's, kept out of the packed weight (see the class docstring). Stored with the weight's
        row sums in one buffer, which state_dict() saves and load_state_dict() restores with the packed weight."""
        weight_sums = self.weight().dequantize().sum(1)
        offsets = torch.stack([weight_sums, bias if bias is not None else torch.zeros_like(weight_sums)])
        self.register_buffer("row_offsets", offsets)

    def bias(self) -> torch.Tensor:
        return self.row_offsets[1]

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        rows = x.reshape(-1, x.shape[-1]).float()
        low = rows.amin(-1, keepdim=True).clamp_(max=0)
        # at least levels / the largest float, so that levels / width stays finite (an all-zero row: 0 at every step)
        width = rows.amax(-1, keepdim=True).clamp_(min=0).sub_(low).clamp_(min=MIN_ROW_WIDTH)
        inverse = width.reciprocal()
        levels = 127 if self.reduce_range else 255
        packed = self._modules["_packed_params"]._packed_params  # as Int8DynamicLinear.forward reads it
        onednn = self.takes_onednn(rows.shape[0])
        # Each row on 0..levels, which both kernels round to its steps (half to even) and sum in int32, then scale by
        # the weight's channel scale alone (activation scale 1: one rounding, the same in both kernels and however
        # they block the rows, so that the two give the same bits); the row's own step is applied below.
        step = inverse.mul_(levels)
        normalized = rows_times(x, rows, step).sub_(low * step)
        if onednn:
            # To oneDNN as int8 less the zero point `half` (torch converts float32 to int8 several times faster than
            # to uint8); oneDNN adds it back in int32.
            half = 128 if levels > 127 else 0
            quantized = normalized.round_().sub_(half).to(torch.int8)
            output = self.onednn_weight.packed_from(packed).product(quantized, 1.0, -half, None)
        else:
            output = call_on_packed_weights(LINEAR_ROW_SCALED, normalized, 1.0, 0, packed)
        weight_sums, bias = self.row_offsets
        # Element by element (not one rank-2 product, whose kernel rounds a lone row otherwise): a row's result is
        # the same in any batch (to the bit on the Xeon measured). In place: on a 2-core Xeon VM a fresh (rows, out)
        # tensor cost several times a pass over it (in one process, the int8 encoder took 4-11% longer with one).
        output.mul_(width / levels).addcmul_(low, weight_sums).add_(bias)
        return output.reshape(*x.shape[:-1], output.shape[-1]).to(x.dtype)


def int8_linear(
    linear: nn.Linear, reduce_range: bool, per_token: bool = False, bias: torch.Tensor | None = None
) -> Int8DynamicLinear:
    """An int8 copy of `linear`: weights with one scale per output channel (per_channel_dynamic_qconfig's weight
    observer: symmetric, -128..127), bias kept in float32 (`bias`, if given, for a layer without one); activations
    scaled per row if `per_token` (Int8RowScaledLinear), else per tensor."""
    if bias is not None and linear.bias is not None:
        raise ValueError(
            f"int8_linear(bias=...): {linear} has a bias of its own; pass a bias only for a layer without one."
        )
    weight = linear.weight.detach().float()
    observer = per_channel_dynamic_qconfig.weight()
    observer(weight)
    scales, zero_points = observer.calculate_qparams()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=QUANTIZED_DTYPE_DEPRECATION, category=UserWarning)
        int8_weight = torch.quantize_per_channel(weight, scales.double(), zero_points.long(), 0, torch.qint8)
        if linear.bias is not None:
            bias = linear.bias.detach().float()
        if per_token:
            quantized = Int8RowScaledLinear(linear.in_features, linear.out_features, bias_=False)
            quantized.set_weight_bias(int8_weight, None)
            quantized.prepare_row_scaling(bias)
        else:
            quantized = Int8DynamicLinear(linear.in_features, linear.out_features, bias_=bias is not None)
            quantized.set_weight_bias(int8_weight, bias)
    quantized.reduce_range = reduce_range
    return quantized.train(linear.training)


def refuse_int8_training(model: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError(
            f"{type(model).__name__} was quantized with model.quantize('int8') and is for inference only: torch's "
            "quantized linear kernels have no backward, so no gradient would pass through them and training would "
            "silently leave the model (nearly) unchanged. Fine-tune the float32 model, then quantize it."
        )
    return type(model).train(model, False)


def int8_layer_names(model: nn.Module) -> list[str]:
    """The names of the int8 linear layers (torch's dynamically quantized ones, ours included) anywhere in `model`."""
    return [name for name, module in model.named_modules() if isinstance(module, DynamicQuantizedLinear)]


def quantization_state(model: nn.Module) -> str | None:
    """What quantize() has left in `model`, judged by the model itself: "int8" where it holds int8 layers (of a
    quantize('int8') of it or of a part of it); "bf16" where quantize('bf16') converted it (its quantization_mode)
    and its floating parameters and buffers are all still bfloat16 (not after model.float()); else None."""
    if int8_layer_names(model):
        return "int8"
    dtypes = {tensor.dtype for tensor in (*model.parameters(), *model.buffers()) if tensor.is_floating_point()}
    return "bf16" if getattr(model, "quantization_mode", None) == "bf16" and dtypes == {torch.bfloat16} else None


def refuse_int8_dtype_change(module: nn.Module, convert) -> None:
    """Raise where `convert` (the function nn.Module._apply maps over the tensors: to(), half(), bfloat16(), ...) would
    give float32 tensors another dtype. `module` belongs to an int8 model, whose int8 layers take float32 activations
    only: the embeddings and LayerNorms would convert and the int8 layers not, and the next forward failed in an int8
    layer ("expected scalar type Float but found BFloat16"). An empty float32 tensor shows what `convert` does."""
    converted = convert(torch.zeros(0))
    if isinstance(converted, torch.Tensor) and converted.dtype != torch.float32:
        raise RuntimeError(
            f"{type(module).__name__} belongs to a model quantized with model.quantize('int8'), whose int8 layers take "
            f"float32 activations only, so it cannot be converted to {converted.dtype} (by to(), half(), bfloat16(), "
            "double() or type()); nothing was converted. Keep the int8 model in float32; for bfloat16 weights, "
            "quantize the float32 model with model.quantize('bf16') instead (int8 models already run attention in "
            "bfloat16 where the CPU computes it natively: bf16_attention)."
        )


def apply_to_quantized(module: nn.Module, mode: str, convert, recurse: bool = True) -> nn.Module:
    """nn.Module._apply, through which to(), half(), float() and the like convert a module's tensors, for a module of
    a model quantize(`mode`) changed (quantize() puts it in place of each module's own): in an int8 model a dtype
    change is refused before anything is converted (refuse_int8_dtype_change; int8 layers stay for good); after a
    conversion quantization_mode says what the model now is (quantization_state): None once model.float() has undone
    quantize('bf16')."""
    if mode == "int8":
        refuse_int8_dtype_change(module, convert)
    result = type(module)._apply(module, convert, recurse)
    if hasattr(module, "save_pretrained"):
        module.quantization_mode = quantization_state(module)
    return result


def refuse_resizing_int8_lm_head(model: nn.Module, new_num_tokens) -> None:
    """Raise, before anything is resized, where the LM head that model.resize_token_embeddings must resize with the
    token table is an int8 layer: transformers' resizing reads its weight as a tensor (an int8 layer's is a method of
    its packed weights) and failed halfway, after replacing the token table, with the config and LM head unchanged."""
    lm_head = model.get_output_embeddings()
    if not isinstance(lm_head, DynamicQuantizedLinear):
        return
    name = next(name for name, module in model.named_modules() if module is lm_head)
    raise RuntimeError(
        f"resize_token_embeddings(new_num_tokens={new_num_tokens!r}): the LM head of {type(model).__name__} ({name}) "
        "is an int8 layer from model.quantize('int8'), whose packed int8 weights cannot be resized; nothing was "
        "changed. Resize the float32 model before quantizing (model.resize_token_embeddings(...), then "
        "model.quantize('int8')), loading it again if need be."
    )


def refuse_int8_save(model: nn.Module, *args, method: str = "save_pretrained", **kwargs) -> None:
    """Raise where any module of `model` holds int8 layers; called by save_pretrained and push_to_hub before they
    write anything (hub.SelfAttnHubMixin). (Models pickled by earlier releases call it, with the save's own
    arguments, from their save_pretrained and push_to_hub, which were partials of it.)"""
    names = int8_layer_names(model)
    if not names:
        return
    if getattr(model, "quantization_mode", None) == "int8":
        holder = f"{type(model).__name__} was quantized with model.quantize('int8')"
    else:
        holder = (
            f"{type(model).__name__} holds int8 layers ({shown(names, 1)}), as a part of it was quantized (e.g. with "
            "model.model.encoder.quantize('int8'))"
        )
    raise RuntimeError(
        f"{method}: {holder}. int8 layers hold torch's packed int8 weights, which the saved format cannot store and "
        "from_pretrained could not rebuild, so nothing was written. Save the float32 model instead (save_pretrained "
        "or push_to_hub before quantizing, or load it again), and call model.quantize('int8') after loading it."
    )


def check_patterns(argument: str, patterns, mode: str, example: str) -> None:
    if not isinstance(patterns, tuple) or not all(isinstance(pattern, str) for pattern in patterns):
        raise TypeError(
            f"quantize({argument}={patterns!r}): pass a list of module-name patterns, e.g. {argument}={example}."
        )
    if patterns and mode != "int8":
        raise ValueError(
            f"quantize({mode!r}, {argument}={list(patterns)!r}): {argument} applies to int8 only; bf16 converts the "
            "whole model."
        )


def check_quantizable(model: nn.Module, mode, keep_float32, per_token_activations, bf16_attention) -> None:
    if not isinstance(mode, str) or mode not in QUANTIZATION_MODES:
        raise ValueError(
            f"quantize(mode={mode!r}): mode must be one of {', '.join(map(repr, QUANTIZATION_MODES))} "
            "(int8: int8 weights and activations on CPU; bf16: bfloat16 weights on any device)."
        )
    if bf16_attention is not None and not isinstance(bf16_attention, bool):
        raise TypeError(
            f"quantize(bf16_attention={bf16_attention!r}): pass True, False, or None (bfloat16 where the CPU computes "
            "it natively)."
        )
    if bf16_attention is not None and mode != "int8":
        raise ValueError(
            f"quantize({mode!r}, bf16_attention={bf16_attention!r}): bf16_attention applies to int8 only; bf16 runs "
            "the whole model, attention included, in bfloat16."
        )
    for argument, patterns, example in (
        ("keep_float32", keep_float32, "['lm_head', '*.ffn.fc2']"),
        ("per_token_activations", per_token_activations, "['*fc1', '*fc2']"),
    ):
        if patterns is not None:
            check_patterns(argument, patterns, mode, example)
    previous = quantization_state(model)
    if previous is not None:
        raise RuntimeError(
            f"{type(model).__name__} is already quantized ({previous!r}); quantize() starts from the float32 model. "
            f"Load the float32 model again and call model.quantize({mode!r}) on it."
        )
    if any(module.training for module in model.modules()):
        raise RuntimeError(
            f"quantize({mode!r}) is for inference, but {type(model).__name__} is in training mode; call model.eval() "
            "first."
        )
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}
    if dtypes - {"float32"}:
        raise ValueError(
            f"quantize({mode!r}) starts from float32 weights, but {type(model).__name__} holds {sorted(dtypes)} ones. "
            "Load it in float32 (from_pretrained(..., dtype=torch.float32)) and quantize that."
        )
    if mode == "int8" and (adapters := adapter_layers(model)):
        raise ValueError(
            f"quantize('int8'): {adapters[0]} holds PEFT adapters ({type(model.get_submodule(adapters[0])).__name__}); "
            "int8 would replace their linear layers too, which PEFT then cannot run. Merge them into the weights "
            "first (model = peft_model.merge_and_unload()), then quantize; or quantize('bf16'), which keeps them."
        )
    if mode == "int8":
        devices = {str(t.device) for t in [*model.parameters(), *model.buffers()] if t.device.type != "cpu"}
        if devices:
            raise ValueError(
                f"quantize('int8') needs the model on CPU, but it is on {sorted(devices)}: int8 dynamic quantization "
                "runs on CPU only. Use model.quantize('bf16') on a GPU, or move the model to the CPU first "
                "(model.to('cpu'))."
            )


def adapter_layers(model: nn.Module) -> list[str]:
    """The names of the PEFT tuner layers (LoRA, IA3, ...) in `model`; none where PEFT is not installed."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def matching(names, patterns) -> list[str]:
    return [name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]


def patterns_or_default(
    model: nn.Module, argument: str, patterns, default, names: list[str], example: str, float32_names=()
):
    """The patterns `argument` asks for, or with None its `default` within each encoder stack (within_encoders). A
    given pattern that matches none of `names` is an error, so that a misspelt one does not silently leave the model
    other than asked; one that matches only layers left in float32 (`float32_names`) is no misspelling: told so."""
    if patterns is None:
        return within_encoders(model, default)
    for pattern in patterns:
        if matching(names, [pattern]):
            continue
        left_float32 = matching(float32_names, [pattern])
        if left_float32:
            more = ", ..." if len(left_float32) > 3 else ""
            raise ValueError(
                f"quantize('int8', {argument}=...): the pattern {pattern!r} matches only linear layers left in "
                f"float32 ({', '.join(left_float32[:3])}{more}) by keep_float32 (or as pruning left their weight "
                f"empty), and {argument} applies to int8 layers. Drop {pattern!r} from {argument}, or from "
                "keep_float32 the pattern that keeps those layers."
            )
        raise ValueError(
            f"quantize('int8', {argument}=...): the pattern {pattern!r} matches no linear layer of "
            f"{type(model).__name__} to quantize. Patterns are fnmatch patterns of module names such as "
            f"{sorted(names)[:3]} (model.named_modules() lists them all); {example}."
        )
    return patterns


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: module for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, nn.Linear)
    }


def linears_to_quantize(model: nn.Module, keep_float32) -> dict[str, nn.Linear]:
    """The linear layers (nn.Linear and its subclasses) by name, less those a `keep_float32` pattern matches
    (fnmatch against the module's names in model.named_modules(), any of them for a module reachable by several);
    None: KEEP_FLOAT32_DEFAULT in each encoder stack. A layer whose weight has no elements (a projection of an
    attention with every head pruned) stays float32 too: it computes nothing but its bias, and a weight without rows
    has no channel to take an int8 scale from."""
    linears = linear_layers(model)
    keep_float32 = patterns_or_default(
        model, "keep_float32", keep_float32, KEEP_FLOAT32_DEFAULT, list(linears), "'*.ffn.fc2' keeps every fc2"
    )
    kept = {id(linears[name]) for name in matching(linears, keep_float32)}
    targets = {
        name: module for name, module in linears.items() if id(module) not in kept and module.weight.numel() > 0
    }
    if not targets:
        # The model would change nothing but refuse training and saving as if int8.
        raise ValueError(
            f"quantize('int8', keep_float32={list(keep_float32)!r}): the patterns keep every linear layer of "
            f"{type(model).__name__} in float32 ({len(linears)} layers, e.g. {', '.join(sorted(linears)[:3])}), so no "
            "layer is left to quantize. Narrow keep_float32 to the layers to keep (e.g. ['*.v_proj']), or leave the "
            "model unquantized."
        )
    return targets


def logits_biases_to_fold(model: nn.Module, targets: dict[str, nn.Linear]) -> dict[int, tuple[nn.Module, torch.Tensor]]:
    """The generating heads in `model` that add a `final_logits_bias` after an LM head without a bias of its own that
    becomes int8 (Marian and BART conversions) and that nothing else calls (one name in `targets`, which lists every
    name of a module): by the LM head's id, the head and that bias. Their int8 LM head takes the bias as its own (added
    in fbgemm's float32 epilogue with per-tensor activations, after the row scaling with per-token ones) and the head
    adds none: a decoding step at batch 16 (32,000-token vocabulary) had spent 0.26 ms adding it into a fresh tensor
    of the logits (py-spy, int8 Transformer-base)."""
    names = collections.Counter(id(linear) for linear in targets.values())
    folded = {}
    for module in model.modules():
        bias, lm_head = getattr(module, "final_logits_bias", None), getattr(module, "lm_head", None)
        if (
            isinstance(bias, torch.Tensor)
            and isinstance(lm_head, nn.Linear)
            and lm_head.bias is None
            and names[id(lm_head)] == 1
            and bias.shape == (1, lm_head.out_features)
        ):
            folded[id(lm_head)] = (module, bias.detach().float()[0].clone())
    return folded


def quantize_int8(model: nn.Module, keep_float32, per_token_activations, bf16_attention) -> None:
    targets = linears_to_quantize(model, keep_float32)
    reduce_range = not int8_activations_use_full_range()
    per_token_activations = patterns_or_default(
        model, "per_token_activations", per_token_activations, PER_TOKEN_DEFAULT, list(targets),
        "'*fc2' names every fc2", [name for name in linear_layers(model) if name not in targets],
    )
    per_token = {id(targets[name]) for name in matching(targets, per_token_activations)}
    folded = logits_biases_to_fold(model, targets)
    if bf16_attention is None:
        bf16_attention = computes_bf16_natively()
    # Every int8 layer is made before the first goes in, so that a failure leaves the model as it was.
    replacements: dict[int, Int8DynamicLinear] = {}  # a linear module shared by two parents stays shared
    for linear in targets.values():
        if id(linear) not in replacements:
            bias = folded[id(linear)][1] if id(linear) in folded else None
            replacements[id(linear)] = int8_linear(linear, reduce_range, id(linear) in per_token, bias)
    for name, linear in targets.items():
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacements[id(linear)])
    for head, _ in folded.values():
        head.final_logits_bias = None  # now in the int8 LM head
    for module in model.modules():
        if hasattr(module, "attention_dtype"):  # selfattn's attention modules (model.py), which this file cannot import
            module.attention_dtype = torch.bfloat16 if bf16_attention else None
    # The float parameters left (embeddings, LayerNorms) no longer train usefully; without gradients an inference
    # forward outside torch.no_grad() never reaches Int8DynamicLinear's refusal.
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in model.modules():
        # Every PreTrainedModel inside (the encoder and decoder stacks too) refuses training. Saving and pushing are
        # refused by every model that holds int8 layers, however deep (refuse_int8_save).
        if hasattr(module, "save_pretrained"):
            # partial rather than a bound method: it survives copy.deepcopy and pickling (torch.save(model)).
            module.train = functools.partial(refuse_int8_training, module)


def as_patterns(patterns):
    return tuple(patterns) if isinstance(patterns, (list, tuple, set, frozenset)) else patterns


def quantize(
    model: nn.Module, mode: str, keep_float32=None, per_token_activations=None, bf16_attention=None
) -> nn.Module:
    """Quantize `model` in place for inference ("int8" or "bf16", see the module docstring) and return it.
    With "int8": keep_float32, fnmatch patterns of linear layers' module names to leave in float32 (None: the encoder's
    value projections, KEEP_FLOAT32_DEFAULT; [] quantizes every linear layer); per_token_activations, those of the
    layers whose activations get one scale per row (None: the encoder's fc1 and fc2, PER_TOKEN_DEFAULT; [] for
    none); bf16_attention, whether attention and its key/value cache run in bfloat16 (None: where the CPU computes
    it natively, computes_bf16_natively)."""
    keep_float32 = as_patterns(keep_float32)
    per_token_activations = as_patterns(per_token_activations)
    check_quantizable(model, mode, keep_float32, per_token_activations, bf16_attention)
    if mode == "int8":
        quantize_int8(model, keep_float32, per_token_activations, bf16_attention)
    else:
        model.to(torch.bfloat16)
    for module in model.modules():
        if hasattr(module, "save_pretrained"):
            module.quantization_mode = mode
        if mode == "int8":
            # partial rather than a bound method: it survives copy.deepcopy and pickling (torch.save(model)). Only
            # int8 needs it (a bf16 model's quantization_mode judges its dtypes, quantization_state): each partial
            # holds its module, a reference cycle that keeps the model alive after `del model` until gc.collect(),
            # which int8 models pay already for refuse_int8_training.
            module._apply = functools.partial(apply_to_quantized, module, mode)
    return model
