"""Every fast path against the plain path it replaces, on tiny random models (float32, tolerance 1e-5):

- unpadded encoding (PackedSequences): a padded batch runs on its real tokens only;
- the masked-LM loss over the scored tokens only (scored_token_logits);
- the opt-in oneDNN CPU inference mode (enable_onednn_inference);
- the opt-in compiled decoding (enable_compiled_decoding: static cache, torch.compile'd decoding step).

The plain path is forced by raising the padding share unpadding needs above 1 (`never_unpad`), by computing
the loss from the full logits, or by leaving the mode off.

Generated tokens must be identical (that is what the fast paths promise); the models that generate have large
weights (initializer_range=0.2) so that their logits are far from ties. A copied, pickled or reloaded model
has the original's weights exactly and its outputs to 1e-5: MKL's fp32 GEMM does not promise identical
rounding for separately allocated copies of the same weights on every CPU.
"""

import copy
import gc
import io

import pytest
import torch
from conftest import PAD_TOKEN_ID, make_tiny_config
from transformers import GenerationConfig

import modeling_selfattn.fast_paths as fast_paths
import modeling_selfattn.packing as packing
from modeling_selfattn import (
    SelfAttnForCausalLM,
    SelfAttnForConditionalGeneration,
    SelfAttnForMaskedLM,
    SelfAttnForSequenceClassification,
    SelfAttnModel,
)
from modeling_selfattn.fast_paths import enable_compiled_decoding, enable_onednn_inference

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


@pytest.fixture
def never_unpad(monkeypatch):
    """Within the test, call never_unpad() to make every later forward take the padded path."""
    return lambda: monkeypatch.setattr(packing, "MIN_PADDING_SHARE_TO_UNPAD", 2.0)


@pytest.fixture
def count_packings(monkeypatch):
    """A list that grows by one entry each time a batch is packed."""
    packings = []
    original = packing.PackedSequences.from_attention_mask.__func__

    def counting(cls, attention_mask):
        packings.append(tuple(attention_mask.shape))
        return original(cls, attention_mask)

    monkeypatch.setattr(packing.PackedSequences, "from_attention_mask", classmethod(counting))
    return packings


def build(model_class, shape="encoder", seed=0, **overrides):
    torch.manual_seed(seed)
    config = make_tiny_config(shape, **overrides)
    return model_class(config).eval()


def assert_same_weights(model, other) -> None:
    expected, actual = model.state_dict(), other.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def real_token_diff(first: torch.Tensor, second: torch.Tensor, attention_mask: torch.Tensor) -> float:
    real = attention_mask.bool()
    return (first[real] - second[real]).abs().max().item()


# --- unpadded encoding -----------------------------------------------------------------------------------------

ENCODER_VARIANTS = {
    "post_ln_sdpa": ({}, "sdpa", "right"),
    "post_ln_eager": ({}, "eager", "right"),
    "pre_ln_sinusoidal": ({"pre_layer_norm": True, "position_embedding_type": "sinusoidal"}, "sdpa", "right"),
    "roberta_positions_left_padding": ({"padding_aware_positions": True, "position_offset": 1}, "sdpa", "left"),
}


@pytest.mark.parametrize("variant", list(ENCODER_VARIANTS))
def test_unpadded_encoder_matches_the_padded_path(variant, never_unpad, count_packings):
    overrides, attn_implementation, padding_side = ENCODER_VARIANTS[variant]
    model = build(SelfAttnModel, **overrides)
    model.set_attn_implementation(attn_implementation)
    batch = padded_batch(padding_side=padding_side)
    batch["token_type_ids"] = (torch.arange(16) >= 5).long().expand(len(LENGTHS), -1) * batch["attention_mask"]
    with torch.no_grad():
        unpadded = model(**batch)
        assert len(count_packings) == 1
        never_unpad()
        padded = model(**batch)
    assert len(count_packings) == 1
    assert real_token_diff(unpadded.last_hidden_state, padded.last_hidden_state, batch["attention_mask"]) <= TOLERANCE
    padding = batch["attention_mask"] == 0
    with torch.no_grad():  # padding positions keep their embeddings
        embedded = model.get_encoder().embeddings(batch["input_ids"], token_type_ids=batch["token_type_ids"])
    assert torch.equal(unpadded.last_hidden_state[padding], embedded[padding])
    if padding_side == "right":  # the pooler reads the first token, real with right padding
        torch.testing.assert_close(unpadded.pooler_output, padded.pooler_output, rtol=0, atol=TOLERANCE)


def test_unpadded_training_gives_the_same_loss_and_gradients(never_unpad, count_packings):
    model = build(SelfAttnForMaskedLM).train()  # dropout is 0 in the tiny configs
    batch = padded_batch()
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def loss_and_gradients():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()}

    unpadded_loss, unpadded_gradients = loss_and_gradients()
    never_unpad()
    padded_loss, padded_gradients = loss_and_gradients()
    assert len(count_packings) == 1
    assert abs(unpadded_loss - padded_loss) <= TOLERANCE
    for name, gradient in padded_gradients.items():
        torch.testing.assert_close(unpadded_gradients[name], gradient, rtol=0, atol=TOLERANCE, msg=name)


def test_sequence_classification_logits_match_the_padded_path(never_unpad, count_packings):
    model = build(SelfAttnForSequenceClassification, num_labels=3)
    batch = padded_batch()
    with torch.no_grad():
        unpadded = model(**batch).logits
        never_unpad()
        padded = model(**batch).logits
    assert len(count_packings) == 1
    torch.testing.assert_close(unpadded, padded, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize(
    "case",
    ["output_attentions", "output_hidden_states", "little_padding", "no_mask", "flex_attention"],
)
def test_padded_path_is_kept_where_unpadding_does_not_apply(case, count_packings):
    model = build(SelfAttnModel)
    model.set_attn_implementation("eager")  # the one that returns attention maps
    batch = padded_batch()
    kwargs = {}
    if case in ("output_attentions", "output_hidden_states"):
        kwargs[case] = True
    elif case == "little_padding":  # one padding token in 6 x 16: not worth packing
        batch = padded_batch(lengths=(16, 16, 16, 16, 16, 15))
    elif case == "no_mask":
        batch.pop("attention_mask")
    elif case == "flex_attention":
        model.set_attn_implementation("flex_attention")
    with torch.no_grad():
        output = model(**batch, **kwargs)
    assert count_packings == []
    if case == "output_attentions":  # the maps keep the padded layout
        assert output.attentions[0].shape[-2:] == (16, 16)
    if case == "output_hidden_states":
        assert all(state.shape[:2] == (len(LENGTHS), 16) for state in output.hidden_states)


def test_encoder_decoder_generates_the_same_tokens_from_an_unpadded_encoder(never_unpad, count_packings):
    model = build(
        SelfAttnForConditionalGeneration, "encoder_decoder", tie_word_embeddings=False, initializer_range=0.2,
        type_vocab_size=0,
    )
    batch = padded_batch()
    for num_beams in (1, 3):
        unpadded = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, num_beams=num_beams)
        assert len(count_packings) == 1
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(packing, "MIN_PADDING_SHARE_TO_UNPAD", 2.0)
            padded = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, num_beams=num_beams)
        assert torch.equal(unpadded, padded)
        count_packings.clear()


def test_packed_sequences_pack_and_unpack_are_inverse():
    batch = padded_batch(padding_side="left")
    packed = packing.PackedSequences.from_attention_mask(batch["attention_mask"])
    assert packed.cu_seq_lens.tolist() == [0, 16, 28, 37, 46, 49, 50]  # longest first
    assert packed.length_groups == [(0, 1, 16), (16, 1, 12), (28, 2, 9), (46, 1, 3), (49, 1, 1)]
    values, padding = torch.randn(len(LENGTHS), 16, 4), torch.randn(len(LENGTHS), 16, 4)
    restored = packed.unpack(packed.pack(values), padding)
    real = batch["attention_mask"].bool()
    assert torch.equal(restored[real], values[real]) and torch.equal(restored[~real], padding[~real])


# --- masked-LM loss over the scored tokens ---------------------------------------------------------------------


def test_masked_lm_loss_and_gradients_match_the_full_cross_entropy():
    model = build(SelfAttnForMaskedLM).train()
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, 99, (3, 11), generator=generator)
    labels = input_ids.masked_fill(torch.rand(input_ids.shape, generator=generator) > 0.3, -100)

    output = model(input_ids, labels=labels)
    output.loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    assert output.logits.shape == (3, 11, 99) and output.logits.requires_grad  # whole and differentiable

    model.zero_grad(set_to_none=True)
    logits = model(input_ids).logits
    full_loss = torch.nn.functional.cross_entropy(logits.view(-1, 99), labels.view(-1))
    full_loss.backward()
    assert abs(output.loss.item() - full_loss.item()) <= TOLERANCE
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(gradients[name], parameter.grad, rtol=0, atol=TOLERANCE, msg=name)

    # num_items_in_batch (Trainer's gradient accumulation) divides the summed loss the same way
    summed = model(input_ids, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 99), labels.view(-1), reduction="sum") / 7
    assert abs(summed.item() - expected.item()) <= TOLERANCE


# --- oneDNN CPU inference mode ---------------------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def onednn_copy(model):
    return enable_onednn_inference(copy.deepcopy(model))


def max_output_diff(first, second) -> float:
    diffs = [
        (value - second[name]).abs().max().item()
        for name, value in first.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point()
    ]
    return max(diffs)


@needs_onednn
@pytest.mark.parametrize(
    "model_class, shape",
    [(SelfAttnForMaskedLM, "encoder"), (SelfAttnForConditionalGeneration, "encoder_decoder"),
     (SelfAttnForCausalLM, "decoder")],
)
def test_onednn_inference_matches_the_default_path(model_class, shape):
    model = build(model_class, shape, type_vocab_size=0)
    fast = onednn_copy(model)
    assert any(type(module) is fast_paths.OneDNNInferenceLinear for module in fast.modules())
    assert not any(type(module) is torch.nn.Linear for module in fast.modules())
    batch = padded_batch(lengths=(12, 7, 4))
    if shape == "encoder_decoder":
        batch.update(decoder_input_ids=batch["input_ids"][:, :5])
    with torch.no_grad():
        assert max_output_diff(model(**batch), fast(**batch)) <= TOLERANCE
    with torch.inference_mode():
        assert max_output_diff(model(**batch), fast(**batch)) <= TOLERANCE
    assert fast.state_dict().keys() == model.state_dict().keys()


@needs_onednn
@pytest.mark.parametrize("num_beams", [1, 3])
def test_onednn_inference_generates_the_same_tokens(num_beams):
    model = build(
        SelfAttnForConditionalGeneration, "encoder_decoder", tie_word_embeddings=False, initializer_range=0.2,
        type_vocab_size=0,
    )
    batch = padded_batch(lengths=(12, 7, 4))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, num_beams=num_beams)
    assert torch.equal(model.generate(**batch, **kwargs), onednn_copy(model).generate(**batch, **kwargs))


@needs_onednn
def test_onednn_mode_trains_like_the_default_and_follows_weight_updates(monkeypatch):
    model = build(SelfAttnForMaskedLM)
    fast = onednn_copy(model)
    assert fast.lm_head.decoder.weight is fast.model.encoder.embeddings.word_embeddings.weight  # still tied
    batch = padded_batch(lengths=(12, 7, 4))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    onednn_calls = []
    original = fast_paths.onednn_linear
    monkeypatch.setattr(fast_paths, "onednn_linear", lambda *args: onednn_calls.append(1) or original(*args))
    losses = []
    for trained in (model, fast):
        trained.train()
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
        loss = trained(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert onednn_calls == []  # a gradient is needed: nn.Linear's own path
    assert abs(losses[0] - losses[1]) <= TOLERANCE
    for trained in (model, fast):
        trained.eval()
    with torch.no_grad():  # inference after the update uses the updated weights, repacked
        assert max_output_diff(model(**batch), fast(**batch)) <= TOLERANCE
        fast.load_state_dict(build(SelfAttnForMaskedLM, seed=1).state_dict())
        assert max_output_diff(build(SelfAttnForMaskedLM, seed=1)(**batch), fast(**batch)) <= TOLERANCE
    assert onednn_calls, "inference never reached oneDNN: the check on training above proves nothing"


@needs_onednn
def test_onednn_mode_copies_pickles_and_turns_off_without_touching_global_settings():
    settings = (torch.get_num_threads(), torch.backends.mkldnn.enabled, torch.get_float32_matmul_precision())
    model = build(SelfAttnModel)
    fast = onednn_copy(model)
    batch = padded_batch(lengths=(12, 7, 4))
    with torch.no_grad():
        expected = fast(**batch).last_hidden_state
        buffer = io.BytesIO()
        torch.save(fast, buffer)
        buffer.seek(0)
        for other in (torch.load(buffer, weights_only=False), copy.deepcopy(fast)):
            assert_same_weights(fast, other)
            torch.testing.assert_close(other(**batch).last_hidden_state, expected, rtol=0, atol=TOLERANCE)
        enable_onednn_inference(fast, False)
        assert not any(type(module) is fast_paths.OneDNNInferenceLinear for module in fast.modules())
        assert_same_weights(model, fast)
        plain = model(**batch).last_hidden_state
        torch.testing.assert_close(fast(**batch).last_hidden_state, plain, rtol=0, atol=TOLERANCE)
    assert (torch.get_num_threads(), torch.backends.mkldnn.enabled, torch.get_float32_matmul_precision()) == settings


# --- compiled decoding ------------------------------------------------------------------------------------------


def compiled_steps_ran(model) -> bool:
    forward = model.__dict__.get("forward")
    return isinstance(forward, fast_paths.CompiledDecodingForward) and forward.compiled_step is not None


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
@pytest.mark.parametrize(
    "model_class, shape",
    [(SelfAttnForConditionalGeneration, "encoder_decoder"), (SelfAttnForCausalLM, "decoder")],
)
def test_compiled_decoding_generates_the_same_tokens(model_class, shape, num_beams):
    torch._dynamo.reset()
    model = build(model_class, shape, tie_word_embeddings=False, initializer_range=0.2, type_vocab_size=0)
    batch = padded_batch(lengths=(8, 5, 3), padding_side="right" if shape == "encoder_decoder" else "left")
    # A GenerationConfig of the caller's own leaves the cache and compile settings to the model's.
    generation_config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, num_beams=num_beams, do_sample=False)
    expected = model.generate(**batch, generation_config=generation_config)
    fast = enable_compiled_decoding(copy.deepcopy(model))
    assert fast.generation_config.cache_implementation == "static"
    assert torch.equal(fast.generate(**batch, generation_config=generation_config), expected)
    assert compiled_steps_ran(fast)  # the decoding steps did run compiled
    assert torch.equal(fast.generate(**batch, generation_config=generation_config), expected)  # and again
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    # Copies, pickled or not, compile their own steps rather than calling the original's.
    for other in (copy.deepcopy(fast), torch.load(buffer, weights_only=False)):
        assert not compiled_steps_ran(other) and other.forward.model is other
        assert torch.equal(other.generate(**batch, generation_config=generation_config), expected)
        assert compiled_steps_ran(other)
    enable_compiled_decoding(fast, False)
    assert fast.generation_config.cache_implementation is None and "forward" not in fast.__dict__
    assert torch.equal(fast.generate(**batch, generation_config=generation_config), expected)


@needs_onednn
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_compiled_decoding_with_onednn_runs_onednn_inside_the_compiled_steps(num_beams):
    torch._dynamo.reset()
    model = build(
        SelfAttnForConditionalGeneration, "encoder_decoder", tie_word_embeddings=False, initializer_range=0.2,
        type_vocab_size=0,
    )
    # Eight sequences: a decoding step has enough rows (tokens) for the linears to take oneDNN's path.
    batch = padded_batch(lengths=(8, 5, 3, 8, 2, 6, 7, 4))
    generation_config = GenerationConfig(max_new_tokens=5, min_new_tokens=5, num_beams=num_beams, do_sample=False)
    expected = model.generate(**batch, generation_config=generation_config)
    fast = enable_compiled_decoding(onednn_copy(model))
    assert torch.equal(fast.generate(**batch, generation_config=generation_config), expected)  # compiles
    with torch.profiler.profile() as profile:
        tokens = fast.generate(**batch, generation_config=generation_config)
    assert torch.equal(tokens, expected)
    events = {event.key for event in profile.key_averages()}
    assert any("CompiledFxGraph" in key or "Torch-Compiled Region" in key for key in events)
    assert "selfattn::onednn_linear" in events  # oneDNN called from the compiled steps


@needs_onednn
def test_onednn_packed_weights_are_freed_with_the_model():
    gc.collect()
    before = len(fast_paths._onednn_packed_weights)
    model = onednn_copy(build(SelfAttnModel, add_pooling_layer=False))
    with torch.no_grad():
        model(**padded_batch())
    assert len(fast_paths._onednn_packed_weights) == before + 6 * len(model.encoder.layers)  # q k v o fc1 fc2
    del model
    gc.collect()
    assert len(fast_paths._onednn_packed_weights) == before


def test_compiled_decoding_is_refused_by_a_model_that_does_not_generate():
    with pytest.raises(ValueError, match="does not generate"):
        enable_compiled_decoding(build(SelfAttnForMaskedLM))


# --- CUDA (skipped without a GPU) ------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_implementations() -> list[str]:
    from transformers.utils import is_flash_attn_2_available

    return ["sdpa", "eager"] + (["flash_attention_2"] if is_flash_attn_2_available() else [])


@needs_cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, TOLERANCE), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("implementation", cuda_implementations())
def test_unpadded_encoder_on_cuda_matches_the_padded_path(
    implementation, dtype, tolerance, never_unpad, count_packings
):
    if implementation.startswith("flash") and dtype == torch.float32:
        pytest.skip("flash attention kernels take half precision only")
    model = build(SelfAttnModel, hidden_size=64, intermediate_size=128).to("cuda", dtype)
    model.set_attn_implementation(implementation)
    batch = {name: tensor.cuda() for name, tensor in padded_batch().items()}
    with torch.no_grad():
        unpadded = model(**batch).last_hidden_state
        never_unpad()
        padded = model(**batch).last_hidden_state
    assert len(count_packings) == 1
    assert real_token_diff(unpadded.float(), padded.float(), batch["attention_mask"]) <= tolerance


def test_compiled_decoding_keeps_a_forward_installed_on_the_instance():
    # accelerate's device hooks (device_map=..., dispatch_model) wrap the instance's forward; compiled decoding must
    # call through them, and put them back when turned off.
    model = build(SelfAttnForCausalLM, "decoder", type_vocab_size=0)
    calls = []
    plain = model.forward

    def hooked_forward(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    model.forward = hooked_forward
    ids = torch.randint(3, 99, (1, 4))
    enable_compiled_decoding(model)
    model(ids)
    assert len(calls) == 1 and model.forward.instance_forward is hooked_forward
    enable_compiled_decoding(model, False)
    assert model.forward is hooked_forward
    model(ids)
    assert len(calls) == 2
