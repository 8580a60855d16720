"""generate()'s per-step work on the scores and the cache, made lean: the selfattn models that generate change two
things generate() builds for itself, each with the same results, bit for bit, for less work a step.

The logits processors that block tokens. transformers' versions rebuild a vocabulary-sized mask at every step
(torch.arange, then torch.isin against the blocked ids) and copy the scores through torch.where;
MinLengthLogitsProcessor and MinNewTokensLengthLogitsProcessor also clone the scores at every step, blocking or not;
NoBadWordsLogitsProcessor (SequenceBiasLogitsProcessor) builds a zero bias the size of the scores, adds its one-token
biases into it, then adds that to the scores. Here the blocked ids are kept once per vocabulary size and device and
filled in (`index_fill`), and one-token biases are added directly. Measured on a 2-core Xeon (32,000-token
vocabulary): 0.24 ms a processor a step at batch 1 (the mask, not the scores, is the cost) and 0.4-1.7 ms at batch
16, against 6-60 us here. They replace the processors generate() makes from the generation config, of exactly
transformers' classes; processors the caller passes in (generate's `logits_processor=`) are used as they are, and
still take precedence over a default one of their class as in transformers. Each lean version, like the original,
returns a new tensor and leaves its input unchanged; within generate()'s list (LeanLogitsProcessorList), adjacent
blocking processors share one new tensor.

The self-attention cache. transformers' DynamicLayer concatenates the whole cached sequence with the new position at
every step, for keys and values of every layer (torch.cat: 1.3 ms a step of 13 at batch 16 on an int8
Transformer-base, measured); GrowingLayer writes the new positions into room kept after the cached ones, growing its
buffers to twice the length needed when full (up to generate()'s maximum cache length, then doubling). It replaces
the layers of the dynamic cache generate() makes itself (not a cache the caller passes, not an offloaded one), and
generate() turns them back into DynamicLayers, in tensors of their own, before it returns the cache: nothing outside
generate() sees a GrowingLayer, but what watches the model's forward calls within it (transformers' exporters capture
the inputs of a prefill and a decoding step that way); the room beyond the cached positions holds zeros, so that such
a step gives the same outputs on every run. Where an attention lost all its heads (prune_heads), its keys have no
elements, in which DynamicLayer counts no positions; a CountingLayer counts them, in generate() and in the caches
the decoder returns (the attention without heads puts one in place at its update).

Beam search's reordering of the cache (reorder_cache_layers) keeps a static cache on CUDA where it is, so that the
CUDA graphs of compiled decoding steps replay on it.

Shipped with saved models (model.py imports it); it imports nothing of the package.
"""

import functools
import math

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache, StaticLayer
from transformers.generation import GenerationMixin
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    SuppressTokensLogitsProcessor,
)


class BlockedIds:
    """What the token-blocking processors share, first among their bases so that this call replaces the original's:
    the ids to block and whether they block at this step (`ids_and_blocking`); those ids a vocabulary of the scores'
    size holds (which is what torch.isin against arange(vocab) matches), kept per vocabulary size and device, filled
    with -inf."""

    def ids_and_blocking(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, bool]:
        raise NotImplementedError

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return self.blocked(input_ids, scores)

    def blocked(self, input_ids: torch.LongTensor, scores: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """The scores with the ids at -inf where blocking, else unchanged: like transformers' processors, a new
        tensor either way, or `scores` itself, changed, `in_place` (see LeanLogitsProcessorList)."""
        ids, blocking = self.ids_and_blocking(input_ids)
        if not blocking:
            return scores if in_place else scores.clone()
        cache = self.__dict__.setdefault("_blocked_ids", {})
        key = (scores.shape[-1], scores.device)
        if key not in cache:
            ids = ids.to(device=scores.device, dtype=torch.long).flatten()
            cache[key] = ids[(ids >= 0) & (ids < scores.shape[-1])]
        fill = scores.index_fill_ if in_place else scores.index_fill
        return fill(-1, cache[key], -math.inf)


class LeanSuppressTokens(BlockedIds, SuppressTokensLogitsProcessor):
    def ids_and_blocking(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, bool]:
        return self.suppress_tokens, True


class LeanMinLength(BlockedIds, MinLengthLogitsProcessor):
    def ids_and_blocking(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, bool]:
        return self.eos_token_id, input_ids.shape[-1] < self.min_length


class LeanMinNewTokensLength(BlockedIds, MinNewTokensLengthLogitsProcessor):
    def ids_and_blocking(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, bool]:
        return self.eos_token_id, input_ids.shape[-1] - self.prompt_length_to_skip < self.min_new_tokens


class LeanNoBadWords(NoBadWordsLogitsProcessor):
    """With one-token bad words only: the scores plus their bias (SequenceBiasLogitsProcessor's length_1_bias), which
    equals transformers' zero bias plus that bias, added to the scores (0 + b is b, bit for bit). Sequences of
    several tokens take the original path, as do scores of another dtype than the bias (the original adds in the
    scores' dtype)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.prepared_bias_variables:
            self._prepare_bias_variables(scores)
        if self.multi_token_biases or scores.dtype != self.length_1_bias.dtype:
            return super().__call__(input_ids, scores)
        return scores + self.length_1_bias


LEAN_PROCESSORS = {
    SuppressTokensLogitsProcessor: LeanSuppressTokens,
    MinLengthLogitsProcessor: LeanMinLength,
    MinNewTokensLengthLogitsProcessor: LeanMinNewTokensLength,
    NoBadWordsLogitsProcessor: LeanNoBadWords,
}

# Derived from LEAN_PROCESSORS, and matched by exact class (a subclass may return its input as it is, which must then
# not be written into).
LEAN_CLASSES = frozenset(LEAN_PROCESSORS.values())
BLOCKING_PROCESSORS = frozenset(kind for kind in LEAN_CLASSES if issubclass(kind, BlockedIds))


def lean(processor):
    """The lean version of `processor`, with its attributes, where there is one for its exact class; else itself."""
    lean_class = LEAN_PROCESSORS.get(type(processor))
    if lean_class is None:
        return processor
    replacement = lean_class.__new__(lean_class)
    replacement.__dict__.update(processor.__dict__)
    return replacement


class LeanLogitsProcessorList(LogitsProcessorList):
    """generate()'s processor list: transformers' call, each processor in turn, except that
    - in a run of adjacent token-blocking processors (BLOCKING_PROCESSORS) the first makes the one new tensor of the
      run and the others fill their ids into it, since nothing outside this call has seen it;
    - the lean processors, which take (input_ids, scores) alone, are called as transformers' call would call them,
      without its reading of their signature at every step.
    Called alone, each processor still returns a new tensor. The same scores to the bit. At batch 16 (a 32,000-token
    vocabulary, three blocking processors) each copy took 0.3 ms of a 15 ms int8 decoding step (profiled); greedy
    decoding of Transformer-base took 1.5-2.6% less time in int8 (three runs) and 1.7% in float32, in one process,
    alternating (2-core Xeon); nothing measurable at batch 1."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        made_in_this_run = None  # the tensor the current run of blocking processors made
        for processor in self:
            kind = type(processor)
            blocking = kind in BLOCKING_PROCESSORS
            if blocking and scores is made_in_this_run:
                scores = processor.blocked(input_ids, scores, in_place=True)
            elif kind in LEAN_CLASSES:
                scores = processor(input_ids, scores)
            else:
                # transformers' own call of one processor (the extra keywords some processors take)
                scores = LogitsProcessorList([processor])(input_ids, scores, **kwargs)
            made_in_this_run = scores if blocking else None
        return scores


class CountingLayer(DynamicLayer):
    """DynamicLayer that counts the positions cached also where the keys have no elements, as those of an attention
    whose heads were all pruned (DynamicLayer counts none there). transformers' generate() reads the length of a
    cache's first layer, to tell the positions cached from those to feed and to number them; beam search's expansion
    and reordering and cropping go by it too. An attention without heads puts one in place of its layer at each
    update of a DynamicCache (counting_positions), and generate() returns such layers too."""

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0


def counting_positions(layer):
    """`layer`, or where it is a DynamicLayer whose keys have no elements, a CountingLayer holding its tensors."""
    if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.dim() != 4 or layer.keys.numel():
        return layer
    counting = CountingLayer.__new__(CountingLayer)
    counting.__dict__.update(layer.__dict__)
    return counting


class GrowingLayer(CountingLayer):
    """CountingLayer whose keys and values are views of buffers with room for later positions (see the module
    docstring): an update writes into the room instead of concatenating, and beam search's reordering copies the
    buffers anew, so that no tensor handed out before changes. It lives only within generate(), which turns it back
    into a DynamicLayer before returning the cache (LeanGenerationMixin.generate).

    Where DynamicLayer's torch.cat would do something else than append (states that need a gradient, whose buffers
    autograd may have saved; another batch size, head count, head size, dtype or device than the cached ones, which
    torch.cat refuses or promotes), the update is DynamicLayer's own. Whatever replaces `keys` and `values` from
    outside (crop, batch selection) is taken as the cached content at the next update, which copies it into new
    buffers."""

    def __init__(self, max_length: int | None = None):
        super().__init__()
        self.max_length = max_length  # generate()'s maximum cache length: the buffers grow to it, then doubling
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.views: tuple[torch.Tensor, torch.Tensor] | None = None  # the keys and values last handed out

    def holds_views(self) -> bool:
        """Whether `keys` and `values` are still the views of the buffers last handed out (nothing replaced them)."""
        return self.buffers is not None and self.keys is self.views[0] and self.values is self.views[1]

    def appends_as_concatenation(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int) -> bool:
        """Whether writing the states after the cached ones gives what DynamicLayer's torch.cat gives."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in (key_states, value_states, self.keys, self.values)):
            return False
        return length == 0 or all(
            cached.shape[:-2] == states.shape[:-2]
            and cached.shape[-1] == states.shape[-1]
            and cached.dtype == states.dtype
            and cached.device == states.device
            for cached, states in ((self.keys, key_states), (self.values, value_states))
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        if not self.appends_as_concatenation(key_states, value_states, length):
            return super().update(key_states, value_states, *args, **kwargs)
        added = key_states.shape[-2]
        needed = length + added
        if not (self.holds_views() and self.buffers[0].shape[-2] >= needed):
            within_max = self.max_length is not None and needed <= self.max_length
            capacity = min(2 * needed, self.max_length) if within_max else 2 * needed
            # Zeros, not new_empty's uninitialised memory: the buffers are the layer's state, which transformers'
            # exporters record as outputs of an exported generation step (decompose_for_generation captures the
            # cache generate() makes) and compare with eager; room no position has reached must then read the
            # same on every run. Zeroing costs one write of the room per growth, a few times a generate(): greedy
            # decoding of 64 tokens at batch 8 (6 layers of 512, 2-core Xeon, one thread, four runs alternating)
            # took 1.33-1.45 s with zeros and 1.29-1.47 s with new_empty.
            self.buffers = tuple(
                states.new_zeros(*states.shape[:-2], capacity, states.shape[-1])
                for states in (key_states, value_states)
            )
            if length:
                for buffer, cached in zip(self.buffers, (self.keys, self.values)):
                    buffer.narrow(-2, 0, length).copy_(cached)
        # narrow rather than indexing with slices: this runs for every layer at every decoding step.
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer.narrow(-2, length, added).copy_(states)
        self.hand_out(needed)
        return self.keys, self.values

    def hand_out(self, length: int) -> None:
        self.views = tuple(buffer.narrow(-2, 0, length) for buffer in self.buffers)
        self.keys, self.values = self.views

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        length = self.get_seq_length()
        if length == 0 or not self.holds_views():
            super().reorder_cache(beam_idx)
            return
        self.buffers = tuple(buffer.index_select(0, beam_idx.to(buffer.device)) for buffer in self.buffers)
        self.hand_out(length)

    def reset(self) -> None:
        self.buffers = self.views = None
        super().reset()

    def as_dynamic_layer(self) -> DynamicLayer:
        """A DynamicLayer holding the same keys and values, in tensors of their own (no room kept); a CountingLayer
        where the keys have no elements (counting_positions)."""
        layer = DynamicLayer()
        if self.is_initialized:
            layer.lazy_initialization(self.keys, self.values)
            if self.keys.dim() == 4:  # also without elements: their length is the positions cached
                layer.keys, layer.values = self.keys.clone(), self.values.clone()
        return counting_positions(layer)


# generate()'s own keywords that reach prepare_inputs_for_generation with the model's (transformers 5.24).
GENERATION_ONLY_KWARGS = ("tokenizer", "assistant_tokenizer")


class LeanGenerationMixin:
    """For the model classes that generate, before GenerationMixin: generate()'s processor list and cache with the
    lean processors and the growing self-attention cache (see the module docstring)."""

    # transformers' signature, which generate() reads (it forwards inputs_embeds only to a model whose
    # prepare_inputs_for_generation names them).
    @functools.wraps(GenerationMixin.prepare_inputs_for_generation)
    def prepare_inputs_for_generation(self, *args, **kwargs):
        # generate() hands its decoding loop the tokenizers it was given (for stop_strings, or an assistant of another
        # vocabulary) among the model's own keywords, and transformers' loop passes them on to forward(), which
        # transformers' models swallow and ours refuse as unknown: they are generate()'s, not the model's.
        for name in GENERATION_ONLY_KWARGS:
            kwargs.pop(name, None)
        return super().prepare_inputs_for_generation(*args, **kwargs)

    def _merge_criteria_processor_list(self, default_list, custom_list):
        """The processors generate() makes from the generation config, lean, before transformers merges the caller's
        into them: a caller's processor still replaces a default one of its exact class (with transformers'
        warning), kept stock where the caller's is transformers' class and lean where it is a lean one (as an
        assistant model's generate() gets the main model's)."""
        if isinstance(default_list, LogitsProcessorList):
            callers_classes = {type(processor) for processor in custom_list}
            default_list = LeanLogitsProcessorList(
                processor if type(processor) in callers_classes else lean(processor) for processor in default_list
            )
        return super()._merge_criteria_processor_list(default_list, custom_list)

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ):
        caller_cache = model_kwargs.get("cache")
        prepared = super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )
        if model_kwargs.get("cache") is not caller_cache:

            def growing(layer):
                fresh = type(layer) is DynamicLayer and not layer.is_initialized
                return GrowingLayer(max_cache_length) if fresh else layer

            replace_self_attention_layers(model_kwargs["cache"], growing)
        return prepared

    def _reorder_cache(self, cache, beam_idx: torch.LongTensor):
        """Beam search's reordering of the cache after each step (generate() calls this hook when a model has it):
        transformers' own, but for static layers on CUDA (reorder_cache_layers)."""
        reorder_cache_layers(cache, beam_idx)
        return cache

    @functools.wraps(GenerationMixin.generate)
    def generate(self, *args, **kwargs):
        outputs = super().generate(*args, **kwargs)
        replace_self_attention_layers(
            getattr(outputs, "cache", None),
            lambda layer: layer.as_dynamic_layer() if isinstance(layer, GrowingLayer) else layer,
        )
        return outputs


def reorder_cache_layers(cache, beam_idx: torch.LongTensor) -> None:
    """`cache.reorder_cache(beam_idx)`, except that static layers on CUDA reorder in place. Their tensors then keep
    their addresses, which the CUDA graphs of compiled decoding steps replay on (transformers' reordering replaces
    them, and compilation then skips the graphs: measured on an H200). On CPU no graph replays, and replacing the
    tensors saves a copy."""
    parts = [cache]
    if isinstance(cache, EncoderDecoderCache):
        parts = [cache.self_attention_cache, cache.cross_attention_cache]
    layers = [layer for part in parts for layer in part.layers]
    if not any(keeps_addresses(layer) for layer in layers):
        cache.reorder_cache(beam_idx)
        return
    for layer in layers:
        if keeps_addresses(layer):
            beam_idx = beam_idx.to(layer.keys.device)
            layer.keys.copy_(layer.keys.index_select(0, beam_idx))
            layer.values.copy_(layer.values.index_select(0, beam_idx))
        else:
            layer.reorder_cache(beam_idx)


def keeps_addresses(layer) -> bool:
    return type(layer) is StaticLayer and layer.is_initialized and layer.keys.is_cuda


def replace_self_attention_layers(cache, replacement) -> None:
    """Each layer of `cache`'s self-attention cache, where that is a plain (not offloaded) DynamicCache, replaced by
    replacement(layer)."""
    self_attention = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    if type(self_attention) is DynamicCache and not self_attention.offloading:
        self_attention.layers = [replacement(layer) for layer in self_attention.layers]
