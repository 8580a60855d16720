"""lean_generation.py: the lean processors give transformers' processors' scores bit for bit, GrowingLayer holds what
DynamicLayer holds through every operation generate() and users apply, and generate() of both generating heads uses
both (for what it makes itself only) with the same tokens as transformers' processors and cache, and the same scores
and cached states within TOLERANCE: those come out of the model's attention over the cache, which reads the growing
buffers' views where transformers' reads concatenated tensors (bit for bit on the Xeon this was written on; another
CPU's kernels may round a differently laid out input otherwise). Cache operations alone copy data and compare
exactly."""

import contextlib
import copy
import math
import re

import pytest
import torch
from batch_helpers import TOLERANCE
from conftest import EOS_TOKEN_ID, PAD_TOKEN_ID, make_tiny_config
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    SuppressTokensLogitsProcessor,
)

from modeling_selfattn import SelfAttnForCausalLM, SelfAttnForConditionalGeneration
from modeling_selfattn.lean_generation import (
    LEAN_PROCESSORS,
    BlockedIds,
    GrowingLayer,
    LeanLogitsProcessorList,
    lean,
)

VOCAB = 50

# name -> (transformers' processor, prompt lengths to score at): ids out of the vocabulary and below 0 included,
# which the originals' isin against arange(vocab) never matches; lengths on both sides of a minimum length.
PROCESSORS = {
    "suppress": (lambda: SuppressTokensLogitsProcessor([3, 7, 120, 49]), [4]),
    "min_length": (lambda: MinLengthLogitsProcessor(6, torch.tensor([2, 9, 77])), [3, 5, 6, 9]),
    "min_new_tokens": (lambda: MinNewTokensLengthLogitsProcessor(2, 3, [2, 9]), [3, 4, 5, 8]),
    "bad_words": (lambda: NoBadWordsLogitsProcessor([[5], [11], [2]], eos_token_id=2), [4]),
    "bad_word_sequences": (lambda: NoBadWordsLogitsProcessor([[5], [11, 12], [7, 8, 9]]), [1, 4]),
}


def special_scores(batch: int) -> torch.Tensor:
    """Random scores with the values a processor could round or combine differently: infinities, NaN, -0.0."""
    scores = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(batch))
    scores[0, [1, 3, 5]] = torch.tensor([math.inf, -math.inf, math.nan])
    scores[-1, [2, 9, 11]] = torch.tensor([-0.0, math.inf, math.nan])
    return scores


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("name", list(PROCESSORS))
@pytest.mark.parametrize("batch", [1, 3])
def test_lean_processor_gives_transformers_scores_to_the_bit(name, batch):
    make, lengths = PROCESSORS[name]
    original, replacement = make(), lean(make())
    assert type(replacement) is LEAN_PROCESSORS[type(original)] and isinstance(replacement, type(original))
    for length in lengths:
        input_ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))
        scores = special_scores(batch)
        before = scores.clone()
        expected, result = original(input_ids, scores), replacement(input_ids, scores)
        assert same_bits(result, expected), (name, length)
        assert same_bits(scores, before) and result.data_ptr() != scores.data_ptr()  # a new tensor, input unchanged


def test_other_processors_are_kept():
    processor = SuppressTokensLogitsProcessor([3])
    subclassed = type("Custom", (SuppressTokensLogitsProcessor,), {})([3])
    assert lean(subclassed) is subclassed
    assert type(lean(processor)) is not SuppressTokensLogitsProcessor


class Doubling(LogitsProcessor):
    """A processor of the caller's, between blocking ones: it ends their run."""

    def __call__(self, input_ids, scores):
        return scores * 2


@pytest.mark.parametrize("length", [3, 5, 8])
@pytest.mark.parametrize("with_callers_between", [False, True])
def test_adjacent_blocking_processors_share_one_new_tensor(length, with_callers_between, monkeypatch):
    makes = [PROCESSORS[name][0] for name in ("min_length", "min_new_tokens", "suppress", "bad_words")]
    stock = [make() for make in makes]
    if with_callers_between:
        stock.insert(1, Doubling())
    leaner = LeanLogitsProcessorList(lean(processor) for processor in stock)
    input_ids = torch.randint(0, VOCAB, (3, length), generator=torch.Generator().manual_seed(length))
    scores = special_scores(3)
    before = scores.clone()
    made = []
    monkeypatch.setattr(torch.Tensor, "index_fill", spy(torch.Tensor.index_fill, made))
    monkeypatch.setattr(torch.Tensor, "clone", spy(torch.Tensor.clone, made))
    result = leaner(input_ids, scores)
    monkeypatch.undo()
    assert same_bits(result, LogitsProcessorList(stock)(input_ids, scores))
    assert same_bits(scores, before) and result.data_ptr() != scores.data_ptr()
    # one new tensor for each run of blocking processors: [min_length, min_new_tokens, suppress], or
    # [min_length] and [min_new_tokens, suppress] around the caller's
    assert len(made) == (2 if with_callers_between else 1)


def test_a_subclass_of_a_blocking_processor_ends_the_run():
    """A caller's subclass of a lean processor that gives its input back unchanged: the next blocking processor must
    not write into that input."""

    class GivesInputBack(LEAN_PROCESSORS[SuppressTokensLogitsProcessor]):
        def __call__(self, input_ids, scores):
            return scores

    given_back = GivesInputBack.__new__(GivesInputBack)
    given_back.__dict__.update(lean(SuppressTokensLogitsProcessor([3])).__dict__)
    processors = LeanLogitsProcessorList([given_back, lean(SuppressTokensLogitsProcessor([5]))])
    scores = special_scores(2)
    before = scores.clone()
    processors(torch.zeros(2, 4, dtype=torch.long), scores)
    assert same_bits(scores, before)


def build_model(shape: str):
    torch.manual_seed(0)
    config = make_tiny_config(shape, tie_word_embeddings=False, initializer_range=0.2, type_vocab_size=0)
    model_class = SelfAttnForConditionalGeneration if shape == "encoder_decoder" else SelfAttnForCausalLM
    return model_class._from_config(config, attn_implementation="sdpa").eval()


SETTINGS = dict(
    max_new_tokens=6, min_new_tokens=4, min_length=3, suppress_tokens=[7, 13], bad_words_ids=[[21], [30]],
    eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, output_scores=True, return_dict_in_generate=True,
)


@pytest.mark.parametrize("shape", ["encoder_decoder", "decoder"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_lean_matches_transformers_processors_and_cache(shape, num_beams, monkeypatch):
    model = build_model(shape)
    input_ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(2))
    calls = []
    for lean_class in LEAN_PROCESSORS.values():
        monkeypatch.setattr(lean_class, "__call__", spy(lean_class.__call__, calls))
    monkeypatch.setattr(BlockedIds, "blocked", spy(BlockedIds.blocked, calls))  # in place, within a run
    monkeypatch.setattr(GrowingLayer, "update", spy(GrowingLayer.update, calls))
    with torch.no_grad():
        leaner = model.generate(input_ids=input_ids, num_beams=num_beams, **SETTINGS)
        assert {type(caller) for caller in calls} == {GrowingLayer} | {
            LEAN_PROCESSORS[kind]
            for kind in (
                MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor, SuppressTokensLogitsProcessor,
                NoBadWordsLogitsProcessor,
            )
        }
        with stock_generation(model, monkeypatch):
            calls.clear()
            expected = model.generate(input_ids=input_ids, num_beams=num_beams, **SETTINGS)
            assert not calls
    assert torch.equal(leaner.sequences, expected.sequences)
    assert len(leaner.scores) == len(expected.scores)
    for score, expected_score in zip(leaner.scores, expected.scores):
        # Blocked tokens are -inf on both sides (assert_close requires infinities to match exactly).
        torch.testing.assert_close(score, expected_score, rtol=0, atol=TOLERANCE, equal_nan=True)
    # The returned cache holds DynamicLayers again, with the same keys and values in tensors of their own.
    returned, stock = (self_attention_layers(output.cache) for output in (leaner, expected))
    assert all(type(layer) is DynamicLayer for layer in returned)
    for layer, stock_layer in zip(returned, stock):
        torch.testing.assert_close(layer.keys, stock_layer.keys, rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(layer.values, stock_layer.values, rtol=0, atol=TOLERANCE)
        assert layer.keys.is_contiguous() and layer.keys.untyped_storage().nbytes() == layer.keys.nbytes


@contextlib.contextmanager
def stock_generation(model, monkeypatch):
    """transformers' own processors and cache for `model` within the block."""
    with monkeypatch.context() as patch:
        for name in ("_merge_criteria_processor_list", "_prepare_cache_for_generation", "generate"):
            patch.setattr(type(model), name, getattr(GenerationMixin, name))
        yield


def self_attention_layers(cache) -> list:
    return (cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache).layers


def spy(call, calls: list):
    def recorded(self, *args, **kwargs):
        calls.append(self)
        return call(self, *args, **kwargs)

    return recorded


def prepared_processors(model, caller_processors: list, **settings) -> LogitsProcessorList:
    return model._get_logits_processor(
        generation_config=GenerationConfig(**settings),
        input_ids_seq_length=5,
        encoder_input_ids=torch.ones(1, 5, dtype=torch.long),
        prefix_allowed_tokens_fn=None,
        logits_processor=LogitsProcessorList(caller_processors),
        device="cpu",
        model_kwargs={},
    )


def test_processors_the_caller_passes_are_used_as_they_are():
    """The caller's processors stay; one of a default's class replaces it, whether it is transformers' (as there)
    or lean (as an assistant model's generate() gets the main model's), so that nothing runs twice."""
    model = build_model("decoder")
    given = MinLengthLogitsProcessor(4, torch.tensor([EOS_TOKEN_ID]))
    processors = prepared_processors(model, [given], suppress_tokens=[7])
    lean_suppress = LEAN_PROCESSORS[SuppressTokensLogitsProcessor]
    assert [type(processor) for processor in processors] == [lean_suppress, type(given)]
    assert type(processors) is LeanLogitsProcessorList
    assert processors[1] is given
    for caller_processor in (SuppressTokensLogitsProcessor([7]), lean(SuppressTokensLogitsProcessor([7]))):
        processors = prepared_processors(model, [caller_processor], suppress_tokens=[7])
        assert len(processors) == 1 and processors[0] is caller_processor


def layer_states(generator: torch.Generator, length: int, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.randn(batch, 2, length, 4, generator=generator) for _ in range(2))


def test_growing_layer_holds_what_dynamic_layer_holds():
    """The same updates and operations on both: a prefill, steps across the buffers' growth (to twice the length
    needed, capped by max_length), beam reordering, batch selection, cropping and a reset."""
    generator = torch.Generator().manual_seed(0)
    growing, dynamic = GrowingLayer(max_length=12), DynamicLayer()

    def both(operation, *args):
        results = [getattr(layer, operation)(*args) for layer in (growing, dynamic)]
        assert torch.equal(growing.keys, dynamic.keys) and torch.equal(growing.values, dynamic.values), operation
        if operation == "update":
            assert all(torch.equal(a, b) for a, b in zip(*results))
            assert results[0][0] is growing.keys
        assert growing.get_seq_length() == dynamic.get_seq_length()

    both("update", *layer_states(generator, 5))
    assert growing.buffers[0].shape[-2] == 10
    for _ in range(4):
        both("update", *layer_states(generator, 1))
    handed_out = growing.keys.clone(), growing.values.clone()
    kept = growing.keys, growing.values
    both("reorder_cache", torch.tensor([2, 0, 0]))
    assert torch.equal(kept[0], handed_out[0]) and torch.equal(kept[1], handed_out[1])  # reordered into new buffers
    both("update", *layer_states(generator, 1))  # 10 positions: the buffers are full
    buffers = growing.buffers
    both("update", *layer_states(generator, 1))
    assert growing.buffers[0].shape[-2] == 12 and growing.buffers is not buffers  # grown, to max_length at most
    both("update", *layer_states(generator, 1))  # 12 positions: full again
    both("update", *layer_states(generator, 1))
    assert growing.buffers[0].shape[-2] == 26  # past max_length: doubling, not a new buffer at every step
    both("crop", -3)
    both("update", *layer_states(generator, 2))
    both("batch_select_indices", torch.tensor([1, 2]))
    both("update", *layer_states(generator, 1, batch=2))
    both("batch_repeat_interleave", 2)
    both("update", *layer_states(generator, 1, batch=4))
    growing.reset(), dynamic.reset()
    assert growing.buffers is None and not growing.is_initialized
    both("update", *layer_states(generator, 3))


@contextlib.contextmanager
def uninitialised_memory_filled():
    """torch fills the memory new_empty hands out (NaN for floats) in its deterministic mode: what an allocation leaves
    uninitialised then shows, on every run."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling


def test_growing_layer_room_beyond_the_cached_positions_holds_zeros():
    """The buffers are the layer's state, which transformers' exporters record as outputs of a generation step: room no
    position has reached reads the same on every run."""
    generator = torch.Generator().manual_seed(0)
    layer = GrowingLayer(max_length=12)
    with uninitialised_memory_filled():
        layer.update(*layer_states(generator, 5))  # room for 10
        layer.update(*layer_states(generator, 1))
        layer.reorder_cache(torch.tensor([2, 0, 1]))
        layer.update(*layer_states(generator, 5))  # 11 positions: grown to 12
    for buffer in layer.buffers:
        assert buffer.shape[-2] == 12 and torch.equal(buffer[..., 11:, :], torch.zeros_like(buffer[..., 11:, :]))


@pytest.mark.parametrize("shape", ["encoder_decoder", "decoder"])
def test_exported_generation_steps_give_eager_outputs(shape):
    """transformers' export of the generation steps (decompose_for_generation captures the prefill's and a decoding
    step's inputs from a real generate(), as ExportTesterMixin.test_torch_export_generate_* and
    HfExporter.export_for_generation do) captures generate()'s own cache, GrowingLayers included: the exported
    prefill then returned their buffers, whose room beyond the cached positions was uninitialised memory (up to 1e32
    off eager), where GPT-2's DynamicLayers match. Every output of both steps now equals eager's."""
    from transformers.exporters.exporter_dynamo import DynamoConfig, DynamoExporter
    from transformers.exporters.utils import decompose_for_generation, get_leaf_tensors

    model = build_model(shape)
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(5))
    with uninitialised_memory_filled(), torch.no_grad():
        stages = decompose_for_generation(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        assert list(stages) == ["prefill", "decode"]
        for name, (step, inputs) in stages.items():
            program = DynamoExporter().export(step, inputs, config=DynamoConfig(dynamic=False)).program
            # each run on its own copy: a step writes into the cache it is given
            eager = get_leaf_tensors(step(**copy.deepcopy(inputs)))
            exported = get_leaf_tensors(program.module()(**copy.deepcopy(inputs)))
            assert eager.keys() == exported.keys(), name
            for leaf in eager:
                torch.testing.assert_close(exported[leaf], eager[leaf], rtol=0, atol=TOLERANCE, msg=f"{name}: {leaf}")


def test_caller_cache_is_left_as_it_is():
    model = build_model("decoder")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.generate(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=3, cache=cache)
    assert cache.get_seq_length() > 0 and all(type(layer) is DynamicLayer for layer in cache.layers)


def test_growing_layer_appends_as_dynamic_layer_where_concatenation_would_not_just_append():
    """States that need a gradient (autograd may have saved the buffers), and other batch sizes or dtypes than the
    cached ones, take DynamicLayer's own update: the same errors, type promotion and gradients."""
    generator = torch.Generator().manual_seed(0)
    growing, dynamic = GrowingLayer(), DynamicLayer()
    first = layer_states(generator, 3)
    for layer in (growing, dynamic):
        layer.update(*first)
    with pytest.raises(RuntimeError) as stock_error:
        dynamic.update(*layer_states(generator, 1, batch=1))
    with pytest.raises(RuntimeError, match=re.escape(str(stock_error.value))):
        growing.update(*layer_states(generator, 1, batch=1))
    wider = tuple(states.double() for states in layer_states(generator, 1))
    for layer in (growing, dynamic):
        layer.update(*wider)
    assert growing.keys.dtype == dynamic.keys.dtype == torch.float64 and torch.equal(growing.keys, dynamic.keys)

    growing, dynamic = GrowingLayer(), DynamicLayer()
    weights = torch.ones(4, requires_grad=True)
    gradients = []
    for layer in (growing, dynamic):
        for step in range(3):
            states = layer_states(torch.Generator().manual_seed(step), 1)
            keys, values = layer.update(*(state * weights for state in states))
        (keys.sum() + values.sum()).backward()
        gradients.append(weights.grad.clone())
        weights.grad = None
    assert torch.equal(gradients[0], gradients[1])
