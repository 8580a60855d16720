"""Opt-in speed for generation, applied to a model from outside its class (the model file holds the model only):
`enable_compiled_decoding(model)` runs generate() with a static cache, each decoding step through torch.compile, for
every strategy (greedy, sampling, beam search). It changes no global torch setting, keeps tokens equal to the default
path's and returns the model. Package-only: a saved model does not carry it. (The linear layers' kernel for CPU
float32 inference, oneDNN or nn.Linear's own as timed per shape, is chosen in kernels.py, shipped with the model;
compiled decoding has the decoder's layers time oneDNN on packed copies of their weights.)
"""

import functools
import inspect
import weakref

import torch
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache, StaticLayer
from transformers.utils import logging

from .kernels import Linear, drop_changed_packed_weights, set_linear_kernel

logger = logging.get_logger(__name__)


# Each model's compiled step: one graph, no break in it (fullgraph). Shapes as torch.compile's default (dynamic=None)
# takes them: the first compiled static, a size that then changes compiled again as a symbol, so that sources of every
# length share one graph (a static cache fixes the batch size and the cache length in its buffers: each new one compiles
# a graph of its own). Where torch has it, the recompilations of each model's step are counted apart
# (isolate_recompiles): they would otherwise share torch.compile's limit (torch._dynamo.config.recompile_limit, 8)
# across every model of the class, and an int8 model's step, which names its layers by id (quantization.INT8_LAYERS),
# is each copy's own. Past the limit, a generate() whose steps would need another graph runs them uncompiled
# (CompiledDecodingForward), with a warning; with fullgraph, torch itself would fail the call.
STEP_COMPILE_DEFAULTS = {"fullgraph": True, "dynamic": None}
if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
    STEP_COMPILE_DEFAULTS["isolate_recompiles"] = True
# What torch.compile raises, with fullgraph, when a call would need a graph past the recompile limit: before it runs
# anything of the call, so that the plain forward may take the call instead.
RECOMPILE_LIMIT_ERRORS = tuple(
    error
    for name in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")
    if isinstance(error := getattr(torch._dynamo.exc, name, None), type)
)


def is_decoding_step(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """A generate() call past the prompt: one new token per sequence, on a static cache holding positions, asking for
    no attentions or hidden states."""
    cache = kwargs.get("cache")
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    return (
        not model.training
        and not args
        and (tokens := new_tokens(model, kwargs)) is not None
        and tokens.shape[1] == 1
        and isinstance(cache, Cache)
        and all(holds_positions(layer) for layer in cache.layers)
        and not kwargs.get("output_attentions")
        and not kwargs.get("output_hidden_states")
    )


def new_tokens(model: nn.Module, kwargs: dict) -> torch.Tensor | None:
    """The tokens (or embeddings) the decoder is given, None where it is given none by keyword."""
    decoder = "decoder_" if model.config.is_encoder_decoder else ""
    for name in (f"{decoder}input_ids", f"{decoder}inputs_embeds"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def decoding_layers(model: nn.Module) -> list[Linear]:
    """The selfattn Linear layers a decoding step runs: all but the encoder's."""
    encoder = model.get_encoder() if model.config.is_encoder_decoder else None
    encoder_modules = set(encoder.modules()) if encoder is not None else set()
    return [module for module in model.modules() if isinstance(module, Linear) and module not in encoder_modules]


def holds_positions(layer) -> bool:
    """A static layer holding cached positions. On CUDA, being initialized stands for it: static layers keep their
    length on the cache's device, and reading it would wait for the GPU at every step. (A one-token prompt on a
    cache passed in again after reset() then runs through the compiled step too, with the same tokens; longer
    prompts, which is_decoding_step tells by their length, run the plain forward.)"""
    if not (isinstance(layer, StaticLayer) and layer.is_initialized):
        return False
    return layer.keys.is_cuda or layer.get_seq_length() > 0


def device_type(model: nn.Module) -> str:
    return next(model.parameters()).device.type


class CompiledDecodingForward:
    """Stands in for a model's `forward` (an instance attribute, which nn.Module's call prefers to the class's):
    decoding steps go through one torch.compile'd forward, every other call (the prompt, training, outputs recorded)
    through the plain one. The plain one is what `forward` was before: the class's, or a wrapper already installed
    on the instance (accelerate's device hooks), which keeps working inside the compiled step too. Its signature is
    the model's, which generate() and Trainer read."""

    def __init__(self, model: nn.Module, compile_options: dict, packed_layers: list[Linear], settings_before: tuple):
        self.model = model
        self.compile_options = compile_options
        self.compiled_step = None
        self.instance_forward = model.__dict__.get("forward")
        self.packed_layers = packed_layers  # those it switched from "auto" to "auto-packed", to switch back
        self.settings_before = settings_before  # generation_config's, to give back (enable_compiled_decoding)
        self.batch_sizes_timed = set()
        self.uncompiled_cache = None  # a weak reference to the cache of a generate() that met the recompile limit

    @property
    def plain_forward(self):
        if self.instance_forward is not None:
            return self.instance_forward
        return functools.partial(type(self.model).forward, self.model)

    @functools.cached_property
    def __signature__(self) -> inspect.Signature:
        # Kept: generate() reads it at every step (for models it counts as remote code, as these are once registered
        # for the Auto classes), and computing it took ~50 us a time (measured on a 2-core Xeon).
        return inspect.signature(self.plain_forward)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.plain_forward(*args, **kwargs)
        if not is_decoding_step(self.model, args, kwargs):
            # A prompt: weights may have changed since. Not in training, which reads no packed copy.
            if self.packed_layers and not (self.model.training and torch.is_grad_enabled()):
                drop_changed_packed_weights(self.model)
            return self.plain_forward(*args, **kwargs)
        shape = (new_tokens(self.model, kwargs).shape[0], torch.get_num_threads())
        if shape not in self.batch_sizes_timed:
            # The first step of each batch size (and thread count) runs plainly: kernels.py times its linear layers'
            # kernels there, which a compiled graph cannot do, and the graph then takes its choices.
            self.batch_sizes_timed.add(shape)
            return self.plain_forward(*args, **kwargs)
        cache = kwargs["cache"]
        if self.uncompiled_cache is not None and self.uncompiled_cache() is cache:
            return self.plain_forward(*args, **kwargs)
        if self.compiled_step is None:
            self.compiled_step = torch.compile(self.plain_forward, **self.step_compile_options())
        try:
            return self.compiled_step(*args, **kwargs)
        except RECOMPILE_LIMIT_ERRORS:
            # Kept for the rest of this generate() (its cache): each step would otherwise meet the limit again.
            self.uncompiled_cache = weakref.ref(cache)
            logger.warning_once(
                "enable_compiled_decoding: torch.compile has compiled as many graphs of this model's decoding step as "
                f"its limit allows (torch._dynamo.config.recompile_limit = {torch._dynamo.config.recompile_limit}); a "
                "static cache needs one per batch size (times beams) and cache length. Steps that would need another "
                "graph run uncompiled: the same tokens, at the plain path's speed. Keep to fewer batch sizes and "
                "max_length values, or raise the limit."
            )
            return self.plain_forward(*args, **kwargs)

    def step_compile_options(self) -> dict:
        """The options given; where they name neither a mode nor Inductor options and Inductor compiles, a way to
        run a decoding step's many small kernels with less overhead each:
        - on CUDA, CUDA graphs ("reduce-overhead"), which replay the kernels' launches at once. The cache's buffers
          keep their addresses (transformers marks them static), which graphs need. Not for a model offloaded in part
          to the CPU or disk (device_map), which transformers does not compile either.
        - on the CPU, Inductor's C++ wrapper (`cpp_wrapper`): the step's calls of its kernels from C++ rather than
          Python. Measured on a 2-core Xeon (Transformer-base, 64 new tokens): 7-8% less time a generate() at greedy
          batch 1 and 16 and beam search (4 beams), the same tokens; the first step compiles the wrapper too."""
        options = dict(self.compile_options)
        if "mode" in options or "options" in options or options.get("backend", "inductor") != "inductor":
            return options
        if device_type(self.model) == "cuda":
            offloaded = {"cpu", "disk"} & {str(device) for device in getattr(self.model, "hf_device_map", {}).values()}
            if not offloaded:
                options["mode"] = "reduce-overhead"
        elif device_type(self.model) == "cpu":
            options["options"] = {"cpp_wrapper": True}
        return options

    def __getstate__(self):
        # A compiled step can be neither pickled nor shared by a copy (it calls this model): copies compile their own.
        # Nor its record of timed steps: a copy in another process has no timings yet.
        state = {**self.__dict__, "compiled_step": None, "batch_sizes_timed": set(), "uncompiled_cache": None}
        state.pop("__signature__", None)
        return state


def check_compile_options(enabled: bool, compile_options: dict) -> None:
    """Refuse, at once, an `enabled` that is no bool and options that would be dropped (enabled=False) or that
    torch.compile does not take, by name or by value: the step is compiled only at the first decoding step of a
    generate(), where a bad option would fail that generate() and every later one."""
    if not isinstance(enabled, bool):
        raise TypeError(
            f"enable_compiled_decoding(model, enabled={enabled!r}): enabled must be True or False (a string such as "
            "'no' would count as True); pass enabled=False to turn compiled decoding off."
        )
    if compile_options and not enabled:
        raise TypeError(
            f"enable_compiled_decoding(model, False) turns compiled decoding off, so its compile options "
            f"({', '.join(sorted(compile_options))}) would be ignored; leave them out, or pass enabled=True to compile "
            "with them."
        )
    accepted = [
        name
        for name, parameter in inspect.signature(torch.compile).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(compile_options) - set(accepted))
    if unknown:
        raise TypeError(
            f"enable_compiled_decoding: torch.compile (torch {torch.__version__}) has no option {', '.join(unknown)}; "
            f"it takes {', '.join(accepted)}. Correct or leave out {', '.join(unknown)}."
        )
    backend = compile_options.get("backend", "inductor")
    if not (isinstance(backend, str) or callable(backend)):
        # torch.compile takes any object here and fails only when it first compiles.
        raise TypeError(
            f"enable_compiled_decoding(model, backend={backend!r}): backend must be the name of a torch.compile "
            "backend (torch._dynamo.list_backends() lists them) or a callable backend."
        )
    if compile_options:
        refuse_options_torch_compile_refuses(compile_options)


def refuse_options_torch_compile_refuses(compile_options: dict) -> None:
    """torch.compile checks the mode, the options, their combination and the backend's name when called, before it
    compiles anything (it compiles at the first call of what it returns): call it on a function never run, with the
    options alone and then with each, to name the one at fault."""

    def refusal(options: dict) -> Exception | None:
        try:
            torch.compile(lambda: None, **{**STEP_COMPILE_DEFAULTS, **options})
        except Exception as error:  # RuntimeError, InvalidBackend, AssertionError...: whatever torch's checks raise
            return error
        return None

    error = refusal(compile_options)
    if error is None:
        return
    at_fault = [name for name in compile_options if refusal({name: compile_options[name]}) is not None]
    given = ", ".join(f"{name}={compile_options[name]!r}" for name in at_fault or compile_options)
    combination = "" if at_fault else " together"
    raise ValueError(
        f"enable_compiled_decoding(model, {given}): torch.compile (torch {torch.__version__}) refuses "
        f"{'this' if len(at_fault or compile_options) == 1 else 'these'}{combination}: {type(error).__name__}: "
        f"{error}. Correct or leave out {' and '.join(at_fault or compile_options)}."
    ) from error


def enable_compiled_decoding(model: nn.Module, enabled: bool = True, **compile_options) -> nn.Module:
    """Faster generate(): decode with a static cache, each decoding step (one new token per sequence) through a
    torch.compile'd forward, for every strategy (greedy, sampling, beam search; transformers compiles by itself only
    greedy and sampling, and only on accelerators). This removes the per-step Python work of the layers, masks and
    cache. The linear layers a decoding step runs (all but the encoder's) that have the default kernel take
    "auto-packed" (kernels.py): the faster, timed per shape on the first step of each batch size (which runs
    uncompiled for that), of MKL and oneDNN on a packed copy of the weight. The copies cost memory (one more copy of
    the decoder's weights and the LM head, made at the first generate()); each generate() reads the weights once to
    repack any changed since (drop_changed_packed_weights: an edit through `weight.data`, as PEFT's merge makes).
    Figures against MarianMTModel: README, "Speed" (the AMD EPYC paragraph). Tokens are the same as the default
    path's. The first generate() compiles (tens of seconds on CPU, where a C++ compiler is needed), later ones
    reuse it; another source length compiles once more, for every length after it, and each new batch size (times
    beams) or cache length once, up to torch.compile's recompile limit, past which such a generate() decodes
    uncompiled, with a warning. Sets `cache_implementation="static"` on
    `model.generation_config` and turns off transformers' own compilation of the steps, which this replaces; both are
    saved with the generation config by save_pretrained. `compile_options` go to torch.compile (mode, backend, ...);
    without a mode or options, where Inductor (the default backend) compiles, a model on CUDA and not offloaded
    decodes under CUDA graphs (mode "reduce-overhead", as transformers' own compiled generation), and a model on the
    CPU through Inductor's C++ wrapper (options={"cpp_wrapper": True}). `enabled=False` gives back what was there, the
    kernels included, and the generation config's two settings as they were before it was enabled (unless changed
    since); it takes no compile options. Options torch.compile does not take, by name (TypeError) or by
    value (ValueError: an unknown mode or backend, a mode with options), are refused here, not at the first compiled
    step; so is an `enabled` that is no bool. An int8 model (model.quantize("int8"), before or after this call) decodes
    through it too, each int8 layer one opaque operator of the compiled step that runs the layer as in eager mode
    (quantization.INT8_LAYERS).
    """
    if not model.can_generate():
        raise ValueError(f"{type(model).__name__} does not generate; compiled decoding is for generate() models.")
    check_compile_options(enabled, compile_options)
    settings = model.generation_config
    current = model.__dict__.get("forward")
    # The generation settings this call replaces, to give back when disabled: the user's own, from before the first
    # call that enabled it.
    settings_before = (settings.cache_implementation, settings.disable_compile)
    if isinstance(current, CompiledDecodingForward):  # enabled before: start again from the forward it wrapped
        settings_before = current.settings_before
        if current.instance_forward is None:
            del model.forward
        else:
            model.forward = current.instance_forward
        for layer in current.packed_layers:
            if layer.kernel == "auto-packed":
                set_linear_kernel(layer, "auto")
    if enabled:
        packed_layers = [layer for layer in decoding_layers(model) if layer.kernel == "auto"]
        for layer in packed_layers:
            set_linear_kernel(layer, "auto-packed")
        model.forward = CompiledDecodingForward(
            model, {**STEP_COMPILE_DEFAULTS, **compile_options}, packed_layers, settings_before
        )
        settings.cache_implementation, settings.disable_compile = COMPILED_DECODING_SETTINGS
    elif isinstance(current, CompiledDecodingForward) and (
        (settings.cache_implementation, settings.disable_compile) == COMPILED_DECODING_SETTINGS
    ):  # settings changed since enabling are the user's: kept
        settings.cache_implementation, settings.disable_compile = settings_before
    return model


# generation_config's (cache_implementation, disable_compile) while compiled decoding is on: a static cache, and
# transformers' own compilation of the steps off, as this replaces it.
COMPILED_DECODING_SETTINGS = ("static", True)


__all__ = ["enable_compiled_decoding"]
