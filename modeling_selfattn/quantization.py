"""int8 and bf16 inference in one call: `model.quantize("int8")` or `model.quantize("bf16")` (the method of
SelfAttnPreTrainedModel delegates here). Both change the model in place and return it.

- "int8": every linear layer (any nn.Linear, subclasses included; `keep_float32` names some to leave alone) becomes
  torch's dynamically quantized linear (torch.ao.nn.quantized.dynamic.Linear): int8 weights with one symmetric scale
  per output channel; activations quantized on the fly at each call, with one scale for the whole input tensor (so a
  sentence's result depends slightly on the batch it is in); int8 products summed in int32 by torch's fbgemm kernels;
  float32 in and out. CPU only. Embeddings and LayerNorms stay float32; a projection that shares the token table (the
  tied LM head) gets its own int8 copy and the table itself stays float32. Inference only: training mode, gradients,
  save_pretrained and push_to_hub are refused with an error that says what to do instead.
- "bf16": every floating parameter and buffer in bfloat16, LayerNorms included, on any device; generate(), training
  and save_pretrained work as for any bfloat16 model.

Why torch's dynamic quantization rather than torchao's Int8DynamicActivationInt8WeightConfig (per-token activations):
on CPU without torch.compile, torchao's int8 linears ran 5x slower than float32 (its CPU path is written for Inductor
to fuse), torch's 2.4x faster (MiniLM-sized linears, 32x128 tokens, 2-core Xeon with AVX512-VNNI). torch 2.13
deprecates the quantized dtypes (torch.qint8) this builds on (pytorch/pytorch#184982); the warning it gives at every
quantization is silenced here, as the user cannot act on it.

Shipped with saved models (model.py imports it), so it imports nothing of the package.
"""

import fnmatch
import functools
import warnings

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from torch.ao.quantization import per_channel_dynamic_qconfig

QUANTIZATION_MODES = ("int8", "bf16")

# torch 2.13's deprecation of its quantized dtypes (see the module docstring), matched exactly: nothing else is hidden.
QUANTIZED_DTYPE_DEPRECATION = r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor"


def int8_activations_use_full_range() -> bool:
    """Whether this CPU's int8 kernels can take activations over the full 8 bits (0..255). Without VNNI, fbgemm sums
    pairs of uint8 x int8 products in int16, which saturates unless activations are reduced to 7 bits (torch's
    default for dynamic quantization, reduce_range=True). With AVX512-VNNI the products are summed in int32 and the
    eighth bit is free, and worth having: it raised the SST-2 dev accuracy of an int8 MiniLM classifier from 0.69 to
    0.11 points below float32, and the lowest cosine of all-MiniLM-L6-v2's sentence embeddings to float32's from 0.932
    to 0.971 (256 sentences in one batch)."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_vnni") or capabilities.get("amx_int8"))


class Int8DynamicLinear(DynamicQuantizedLinear):
    """torch's dynamically quantized linear (int8 weights with per-channel scales, activations quantized per call
    with one scale per tensor) that refuses to run where its output would be wrong without saying so: its kernel has
    no backward (autograd passes no gradient through it, so a backward pass would silently leave the layers below
    unchanged), and its packed weights live on the CPU. `reduce_range`: activations on 7 bits rather than 8 (see
    int8_activations_use_full_range)."""

    reduce_range = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                "An int8 layer (model.quantize('int8')) got an input that requires a gradient. int8 models are for "
                "inference only: torch's quantized linear kernels have no backward, so no gradient would pass through "
                "them. Run inference under torch.no_grad() with inputs that do not require a gradient, or "
                "fine-tune the float32 model and quantize it afterwards."
            )
        if x.device.type != "cpu":
            raise RuntimeError(
                f"An int8 layer (model.quantize('int8')) got an input on {x.device}, but int8 dynamic quantization "
                "runs on CPU only. Run the int8 model on CPU inputs, or use model.quantize('bf16') on a GPU."
            )
        output = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, self.reduce_range)
        return output.to(x.dtype)


def int8_linear(linear: nn.Linear, reduce_range: bool) -> Int8DynamicLinear:
    """An int8 copy of `linear`: weights with one scale per output channel (per_channel_dynamic_qconfig's weight
    observer: symmetric, -128..127), bias kept in float32."""
    weight = linear.weight.detach().float()
    observer = per_channel_dynamic_qconfig.weight()
    observer(weight)
    scales, zero_points = observer.calculate_qparams()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=QUANTIZED_DTYPE_DEPRECATION, category=UserWarning)
        int8_weight = torch.quantize_per_channel(weight, scales.double(), zero_points.long(), 0, torch.qint8)
        quantized = Int8DynamicLinear(linear.in_features, linear.out_features, bias_=linear.bias is not None)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        quantized.set_weight_bias(int8_weight, bias)
    quantized.reduce_range = reduce_range
    return quantized


def refuse_int8_training(model: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError(
            f"{type(model).__name__} was quantized with model.quantize('int8') and is for inference only: torch's "
            "quantized linear kernels have no backward, so no gradient would pass through them and training would "
            "silently leave the model (nearly) unchanged. Fine-tune the float32 model, then quantize it."
        )
    return type(model).train(model, False)


def refuse_int8_save(model: nn.Module, *args, **kwargs):
    raise RuntimeError(
        f"{type(model).__name__} was quantized with model.quantize('int8'); its linear layers hold torch's packed "
        "int8 weights, which the saved format cannot store and from_pretrained could not rebuild. Save the float32 "
        "model instead (save_pretrained or push_to_hub before quantizing, or load it again), and call "
        "model.quantize('int8') after loading it."
    )


def check_quantizable(model: nn.Module, mode, keep_float32) -> None:
    if not isinstance(mode, str) or mode not in QUANTIZATION_MODES:
        raise ValueError(
            f"quantize(mode={mode!r}): mode must be one of {', '.join(map(repr, QUANTIZATION_MODES))} "
            "(int8: int8 weights and activations on CPU; bf16: bfloat16 weights on any device)."
        )
    if not isinstance(keep_float32, tuple) or not all(isinstance(pattern, str) for pattern in keep_float32):
        raise TypeError(
            f"quantize(keep_float32={keep_float32!r}): pass a list of module-name patterns, e.g. "
            "keep_float32=['lm_head', '*.ffn.fc2']."
        )
    if keep_float32 and mode != "int8":
        raise ValueError(
            f"quantize({mode!r}, keep_float32={list(keep_float32)!r}): keep_float32 applies to int8 only; bf16 "
            "converts the whole model."
        )
    previous = getattr(model, "quantization_mode", None)
    if previous is None and any(isinstance(module, DynamicQuantizedLinear) for module in model.modules()):
        previous = "int8"
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
    if mode == "int8":
        devices = {str(t.device) for t in [*model.parameters(), *model.buffers()] if t.device.type != "cpu"}
        if devices:
            raise ValueError(
                f"quantize('int8') needs the model on CPU, but it is on {sorted(devices)}: int8 dynamic quantization "
                "runs on CPU only. Use model.quantize('bf16') on a GPU, or move the model to the CPU first "
                "(model.to('cpu'))."
            )


def linears_to_quantize(model: nn.Module, keep_float32) -> dict[str, nn.Linear]:
    """The linear layers (nn.Linear and its subclasses) by name, less those a `keep_float32` pattern matches
    (fnmatch against the module's name in model.named_modules()). A pattern that matches no linear layer is an error,
    so that a misspelt one does not silently quantize what it meant to keep."""
    linears = {
        name: module for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, nn.Linear)
    }
    for pattern in keep_float32:
        if not fnmatch.filter(linears, pattern):
            raise ValueError(
                f"quantize('int8', keep_float32=...): the pattern {pattern!r} matches no linear layer of "
                f"{type(model).__name__}. Patterns are fnmatch patterns of module names such as "
                f"{sorted(linears)[:3]} (model.named_modules() lists them all); '*.ffn.fc2' keeps every fc2."
            )
    return {
        name: module
        for name, module in linears.items()
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in keep_float32)
    }


def quantize_int8(model: nn.Module, keep_float32) -> None:
    targets = linears_to_quantize(model, keep_float32)
    reduce_range = not int8_activations_use_full_range()
    replacements: dict[int, Int8DynamicLinear] = {}  # a linear module shared by two parents stays shared
    for name, linear in targets.items():
        if id(linear) not in replacements:
            replacements[id(linear)] = int8_linear(linear, reduce_range)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacements[id(linear)])
    # The float parameters left (embeddings, LayerNorms) no longer train usefully; without gradients an inference
    # forward outside torch.no_grad() never reaches Int8DynamicLinear's refusal.
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in model.modules():
        # Every PreTrainedModel inside (the encoder and decoder stacks too) refuses what would not work.
        if hasattr(module, "save_pretrained"):
            # partial rather than a bound method: it survives copy.deepcopy and pickling (torch.save(model)).
            module.train = functools.partial(refuse_int8_training, module)
            module.save_pretrained = functools.partial(refuse_int8_save, module)
            module.push_to_hub = functools.partial(refuse_int8_save, module)


def quantize(model: nn.Module, mode: str, keep_float32=()) -> nn.Module:
    """Quantize `model` in place for inference ("int8" or "bf16", see the module docstring) and return it.
    keep_float32: with "int8", fnmatch patterns of linear layers' module names to leave in float32."""
    if keep_float32 is None:
        keep_float32 = ()
    if isinstance(keep_float32, (list, tuple, set, frozenset)):
        keep_float32 = tuple(keep_float32)
    check_quantizable(model, mode, keep_float32)
    if mode == "int8":
        quantize_int8(model, keep_float32)
    else:
        model.to(torch.bfloat16)
    for module in model.modules():
        if hasattr(module, "save_pretrained"):
            module.quantization_mode = mode
    return model
