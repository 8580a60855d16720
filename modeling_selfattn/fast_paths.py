"""Opt-in speed for inference, applied to a model from outside its class (the model file holds the model only):

- `enable_onednn_inference(model)`: CPU float32 linears through oneDNN on weights packed once;
- `enable_compiled_decoding(model)`: generate() with a static cache, each decoding step through torch.compile, for
  every strategy (greedy, sampling, beam search).

Neither changes a global torch setting. Both keep outputs equal to the default path's (tokens identical) and return
the model. Package-only: a saved model does not carry them.
"""

import functools
import inspect
import weakref

import torch
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache, StaticLayer


# oneDNN's packed copies of the weights, kept per storage so that they go when the weights go; within a storage
# (several weights may be views of one, e.g. when loaded from a single file) by the weight's place in it, with the
# weight's version when packed, so that an in-place change (optimizer step, load_state_dict) repacks.
_onednn_packed_weights: "weakref.WeakKeyDictionary[torch.UntypedStorage, dict]" = weakref.WeakKeyDictionary()


def onednn_packed_weight(weight: torch.Tensor) -> torch.Tensor:
    storage = weight.untyped_storage()
    packed = _onednn_packed_weights.get(storage)
    if packed is None:  # not setdefault: this runs on every call, and would build a dict each time
        packed = _onednn_packed_weights[storage] = {}
    place = (weight.storage_offset(), tuple(weight.shape), tuple(weight.stride()))
    if place not in packed or packed[place][0] != weight._version:
        packed[place] = (weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
    return packed[place][1]


def onednn_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(input, onednn_packed_weight(weight), bias, "none", [], "")


def onednn_linear_shape(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return input.new_empty(*input.shape[:-1], weight.shape[0])


# torch.compile cannot trace oneDNN's packed tensors; as a custom op the call stays opaque inside a compiled graph.
# Registered once per process: torch refuses a second registration, e.g. from importlib.reload of this module.
if not hasattr(torch.ops.selfattn, "onednn_linear"):
    torch.library.custom_op("selfattn::onednn_linear", onednn_linear, mutates_args=()).register_fake(
        onednn_linear_shape
    )


# Measured on 2-core Xeon CPUs: with fewer input rows (tokens) than this, oneDNN's cost per call outweighs its faster
# kernels, except on a weight this large (an LM head over the vocabulary), where streaming the weight dominates.
ONEDNN_MIN_ROWS = 8
ONEDNN_MIN_WEIGHT_FOR_FEW_ROWS = 4 * 2**20  # elements


class OneDNNInferenceLinear(nn.Linear):
    """nn.Linear that runs CPU float32 inference through oneDNN on a copy of its weight packed once into the
    layout oneDNN's kernels read fastest (plain nn.Linear reads the row-major weight anew on every call), also
    inside torch.compile'd code (compiled decoding). `enable_onednn_inference(model)` turns a
    model's linears into these. Anything else (a gradient needed, another device or dtype, oneDNN disabled, too few
    rows to pay) takes nn.Linear's path. The packed copy follows the weight: it is redone when the weight is changed
    in place (an optimizer step, load_state_dict) or replaced, and freed with it."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        needs_gradient = torch.is_grad_enabled() and (input.requires_grad or self.weight.requires_grad)
        too_few_rows = input.numel() < ONEDNN_MIN_ROWS * self.in_features
        if (
            needs_gradient
            or input.device.type != "cpu"
            or input.dtype != torch.float32
            or self.weight.dtype != torch.float32
            or not torch.backends.mkldnn.enabled
            or (too_few_rows and self.weight.numel() < ONEDNN_MIN_WEIGHT_FOR_FEW_ROWS)
        ):
            return super().forward(input)
        if torch.compiler.is_compiling():
            return torch.ops.selfattn.onednn_linear(input, self.weight, self.bias)
        # The same function without the custom op's dispatch, which costs ~18 us a call (measured) outside compile.
        return onednn_linear(input, self.weight, self.bias)


def enable_onednn_inference(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Every nn.Linear of `model` becomes a OneDNNInferenceLinear (the same module object with the same parameters, so
    hooks, tying and state_dict are untouched), which runs CPU float32 inference on a prepacked copy of its weight
    through oneDNN. Results match the default path up to float32 rounding (the kernels sum in another order);
    training and other devices or dtypes are unaffected. Costs one packed copy of each weight in memory. Combines
    with enable_compiled_decoding (the compiled steps call oneDNN too). `enabled=False` restores plain nn.Linear."""
    if enabled and not torch.backends.mkldnn.is_available():
        raise RuntimeError("This torch build has no oneDNN (mkldnn) support; enable_onednn_inference needs it.")
    for module in model.modules():
        if enabled and type(module) is nn.Linear:
            module.__class__ = OneDNNInferenceLinear
        elif not enabled and type(module) is OneDNNInferenceLinear:
            module.__class__ = nn.Linear
    return model


def is_decoding_step(model: nn.Module, kwargs: dict) -> bool:
    """A generate() call past the prompt, on a static cache, asking for no attentions or hidden states."""
    cache = kwargs.get("cache")
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    return (
        not model.training
        and isinstance(cache, Cache)
        and all(isinstance(layer, StaticLayer) for layer in cache.layers)
        and cache.get_seq_length() > 0
        and not kwargs.get("output_attentions")
        and not kwargs.get("output_hidden_states")
    )


class CompiledDecodingForward:
    """Stands in for a model's `forward` (an instance attribute, which nn.Module's call prefers to the class's):
    decoding steps go through one torch.compile'd forward, every other call (the prompt, training, outputs recorded)
    through the plain one. The plain one is what `forward` was before: the class's, or a wrapper already installed
    on the instance (accelerate's device hooks), which keeps working inside the compiled step too. Its signature is
    the model's, which generate() and Trainer read."""

    def __init__(self, model: nn.Module, compile_options: dict):
        self.model = model
        self.compile_options = compile_options
        self.compiled_step = None
        self.instance_forward = model.__dict__.get("forward")

    @property
    def plain_forward(self):
        if self.instance_forward is not None:
            return self.instance_forward
        return functools.partial(type(self.model).forward, self.model)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.plain_forward)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() or not is_decoding_step(self.model, kwargs):
            return self.plain_forward(*args, **kwargs)
        if self.compiled_step is None:
            self.compiled_step = torch.compile(self.plain_forward, **self.compile_options)
        return self.compiled_step(*args, **kwargs)

    def __getstate__(self):
        # A compiled step can be neither pickled nor shared by a copy (it calls this model): copies compile their own.
        return {**self.__dict__, "compiled_step": None}


def enable_compiled_decoding(model: nn.Module, enabled: bool = True, **compile_options) -> nn.Module:
    """Faster generate(): decode with a static cache, each decoding step (one new token per sequence) through a
    torch.compile'd forward, for every strategy (greedy, sampling, beam search; transformers compiles by itself only
    greedy and sampling, and only on accelerators). This removes the per-step Python work of the layers, masks and
    cache; the matrix products stay as they are (after enable_onednn_inference they run through oneDNN inside the
    compiled step). Tokens are the same as the default path's.
    The first generate() of each new shape compiles (tens of seconds on CPU, where a C++ compiler is needed), later
    ones reuse it. Sets `cache_implementation="static"` on `model.generation_config` and turns off transformers' own
    compilation of the steps, which this replaces; both are saved with the generation config by save_pretrained.
    `compile_options` go to torch.compile (mode, backend, ...); `enabled=False` restores the defaults."""
    if not model.can_generate():
        raise ValueError(f"{type(model).__name__} does not generate; compiled decoding is for generate() models.")
    current = model.__dict__.get("forward")
    if isinstance(current, CompiledDecodingForward):  # enabled before: start again from the forward it wrapped
        if current.instance_forward is None:
            del model.forward
        else:
            model.forward = current.instance_forward
    if enabled:
        model.forward = CompiledDecodingForward(model, {"fullgraph": True, "dynamic": False, **compile_options})
        model.generation_config.cache_implementation, model.generation_config.disable_compile = "static", True
    else:
        model.generation_config.cache_implementation, model.generation_config.disable_compile = None, False
    return model


__all__ = ["OneDNNInferenceLinear", "enable_compiled_decoding", "enable_onednn_inference"]
