"""Attention-head pruning (model.prune_heads, config.pruned_heads) and head importance (head_importance.py), on tiny
random models in float32. A pruned model must compute what the unpruned one computes with the same heads' outputs
zeroed (their columns of o_proj set to 0): max abs difference <= 1e-5, on every attention implementation and the
unpadded path, after save/reload and as remote code."""

import copy
import json

import pytest
import torch
from batch_helpers import TOLERANCE, padded_batch
from conftest import make_tiny_config
from integration_helpers import load_without_package

import modeling_selfattn.packing as packing
from modeling_selfattn import (
    SelfAttnConfig,
    SelfAttnForCausalLM,
    SelfAttnForConditionalGeneration,
    SelfAttnForSequenceClassification,
    SelfAttnModel,
)
from modeling_selfattn import visualize as viz
from modeling_selfattn.checkpoints import ConversionError, export_checkpoint
from modeling_selfattn.head_importance import head_importance, least_important_heads

HEAD_DIM = 8  # tiny configs: hidden 32, 4 heads

# Encoder plan with a partly and a fully pruned layer.
ENCODER_PLAN = {0: [1, 3], 1: [0, 1, 2, 3]}


def build(model_class, shape="encoder", seed=0, **overrides):
    torch.manual_seed(seed)
    return model_class(make_tiny_config(shape, **overrides)).eval()


def attention(model, key: str):
    """The attention module named `key` ("encoder.0", "decoder.1.cross_attn", ...)."""
    (module,) = [module for module in attention_modules_of(model) if module.pruning_key == key]
    return module


def attention_modules_of(model):
    from modeling_selfattn.model import SelfAttnAttention

    return [module for module in model.modules() if isinstance(module, SelfAttnAttention)]


def zeroed_copy(model, resolved_plan: dict[str, list[int]]):
    """The unpruned model with the planned heads' outputs zeroed: their input columns of o_proj set to 0."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for key, heads in resolved_plan.items():
            o_proj = attention(reference, key).o_proj
            for head in heads:
                o_proj.weight[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] = 0
    return reference


def pruned_and_reference(model, plan):
    reference = zeroed_copy(model, model.config.resolve_heads_to_prune(plan))
    pruned = copy.deepcopy(model)
    pruned.prune_heads(plan)
    return pruned, reference


def assert_close(actual, expected, label=""):
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOLERANCE, msg=lambda message: f"{label}: {message}")


def classifier_outputs(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# --- pruning: shapes, config, outputs --------------------------------------------------------------------------


def test_prune_shrinks_projections_and_records_the_heads():
    model = build(SelfAttnForSequenceClassification, num_labels=3)
    model.prune_heads(ENCODER_PLAN)
    assert model.config.pruned_heads == {"encoder.0": [1, 3], "encoder.1": [0, 1, 2, 3]}
    assert model.model.config is model.config  # submodules read the same config
    layer0, layer1 = attention(model, "encoder.0"), attention(model, "encoder.1")
    assert layer0.kept_heads == [0, 2] and layer1.kept_heads == []
    for linear in (layer0.q_proj, layer0.k_proj, layer0.v_proj):
        assert tuple(linear.weight.shape) == (2 * HEAD_DIM, 32) and tuple(linear.bias.shape) == (2 * HEAD_DIM,)
        assert linear.out_features == 2 * HEAD_DIM
    assert tuple(layer0.o_proj.weight.shape) == (32, 2 * HEAD_DIM) and layer0.o_proj.in_features == 2 * HEAD_DIM
    assert tuple(layer1.q_proj.weight.shape) == (0, 32) and tuple(layer1.o_proj.weight.shape) == (32, 0)


def test_pruned_weights_are_the_kept_heads_slices():
    model = build(SelfAttnModel)
    original = copy.deepcopy(attention(model, "encoder.0"))
    model.prune_heads({0: [1, 3]})
    pruned = attention(model, "encoder.0")
    kept = torch.cat([torch.arange(head * HEAD_DIM, (head + 1) * HEAD_DIM) for head in (0, 2)])
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(pruned, name).weight, getattr(original, name).weight[kept])
        assert torch.equal(getattr(pruned, name).bias, getattr(original, name).bias[kept])
    assert torch.equal(pruned.o_proj.weight, original.o_proj.weight[:, kept])
    assert torch.equal(pruned.o_proj.bias, original.o_proj.bias)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("unpadded", [False, True], ids=["padded", "unpadded"])
def test_pruned_encoder_equals_zeroed_heads(attn_implementation, unpadded, monkeypatch):
    if not unpadded:  # any padding share below 2 runs padded
        monkeypatch.setattr(packing, "MIN_PADDING_SHARE_TO_UNPAD", 2.0)
    # Weights larger than the default initialisation's, so that the zeroed heads matter to the logits.
    model = build(SelfAttnForSequenceClassification, num_labels=3, initializer_range=0.2)
    model.set_attn_implementation(attn_implementation)
    pruned, reference = pruned_and_reference(model, ENCODER_PLAN)
    batch = padded_batch()
    packed = packing.packed_sequences_for(batch["attention_mask"], model.config, {})
    assert (packed is not None) == unpadded
    expected = classifier_outputs(reference, batch)
    assert_close(classifier_outputs(pruned, batch), expected, f"{attn_implementation}, unpadded={unpadded}")
    # The zeroed heads change the output: the comparison can fail.
    assert (classifier_outputs(model, batch) - expected).abs().max() > 1e-3


def test_attention_maps_of_a_pruned_model_have_each_layers_heads():
    model = build(SelfAttnModel)
    model.set_attn_implementation("eager")
    model.prune_heads(ENCODER_PLAN)
    with torch.no_grad():
        attentions = model(**padded_batch(), output_attentions=True).attentions
    assert [tuple(layer.shape[:2]) for layer in attentions] == [(6, 2), (6, 0)]


def test_pruning_twice_accumulates():
    model = build(SelfAttnForSequenceClassification, num_labels=3)
    at_once, in_steps = copy.deepcopy(model), copy.deepcopy(model)
    at_once.prune_heads({0: [1, 3], 1: [2]})
    in_steps.prune_heads({0: [3]})
    in_steps.prune_heads({0: [1], 1: [2]})
    assert in_steps.config.pruned_heads == at_once.config.pruned_heads == {"encoder.0": [1, 3], "encoder.1": [2]}
    assert attention(in_steps, "encoder.0").kept_heads == [0, 2]
    batch = padded_batch()
    assert_close(classifier_outputs(in_steps, batch), classifier_outputs(at_once, batch), "two steps vs one")


def test_string_keys_and_int_keys_are_the_same_attention():
    model = build(SelfAttnModel)
    by_name, by_index = copy.deepcopy(model), copy.deepcopy(model)
    by_name.prune_heads({"encoder.1": [2]})
    by_index.prune_heads({1: [2]})
    assert by_name.config.pruned_heads == by_index.config.pruned_heads == {"encoder.1": [2]}


def test_causal_lm_prunes_its_decoder_and_generates_as_the_zeroed_model():
    model = build(SelfAttnForCausalLM, "decoder", type_vocab_size=0)
    pruned, reference = pruned_and_reference(model, {0: [2], 1: [1, 2, 3]})
    assert pruned.config.pruned_heads == {"decoder.0": [2], "decoder.1": [1, 2, 3]}
    batch = padded_batch((7, 4))
    with torch.no_grad():
        assert_close(pruned(**batch).logits, reference(**batch).logits, "logits")
        prompt = {"input_ids": batch["input_ids"][:1, :7]}
        generated = pruned.generate(**prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
        expected = reference.generate(**prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(generated, expected)


SEQ2SEQ_PLAN = {"encoder.1": [0], "decoder.0": [3], "decoder.1": [1, 2], "decoder.1.cross_attn": [0, 1, 2, 3]}


def test_encoder_decoder_prunes_every_kind_of_attention():
    model = build(SelfAttnForConditionalGeneration, "encoder_decoder", type_vocab_size=0)
    pruned, reference = pruned_and_reference(model, SEQ2SEQ_PLAN)
    assert pruned.config.pruned_heads == SEQ2SEQ_PLAN
    batch = padded_batch((7, 5))
    decoder_input_ids = torch.randint(3, 99, (2, 4))
    with torch.no_grad():
        actual = pruned(**batch, decoder_input_ids=decoder_input_ids).logits
        assert_close(actual, reference(**batch, decoder_input_ids=decoder_input_ids).logits, "logits")
        settings = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, num_beams=2)
        assert torch.equal(pruned.generate(**batch, **settings), reference.generate(**batch, **settings))


HEADLESS_LAYER_0 = [
    (SelfAttnForConditionalGeneration, "encoder_decoder", {"decoder.0": [0, 1, 2, 3]}),
    (SelfAttnForCausalLM, "decoder", {0: [0, 1, 2, 3]}),
]


def decoder_logits(model, batch, decoder_ids, **kwargs):
    """The model's outputs over decoder_ids: the decoder's inputs of an encoder-decoder (batch the encoder's), the
    tokens of a causal LM."""
    if model.config.is_encoder_decoder:
        return model(**batch, decoder_input_ids=decoder_ids, **kwargs)
    return model(input_ids=decoder_ids, **kwargs)


@pytest.mark.parametrize("model_class, shape, plan", HEADLESS_LAYER_0, ids=["encoder_decoder", "decoder"])
def test_a_decoder_whose_first_layer_lost_all_heads_decodes_the_same_with_a_cache(model_class, shape, plan):
    """Such a layer caches keys without elements, in which transformers' cache layers count no positions: the decoder
    counts them in the first layer that kept heads."""
    model = build(model_class, shape, type_vocab_size=0, initializer_range=0.2)
    model.prune_heads(plan)
    batch = padded_batch((7, 5))
    decoder_ids = torch.randint(3, 99, (2, 6), generator=torch.Generator().manual_seed(1))
    for attn_implementation in ("eager", "sdpa"):
        model.set_attn_implementation(attn_implementation)
        with torch.no_grad():
            full = decoder_logits(model, batch, decoder_ids).logits
            cache = decoder_logits(model, batch, decoder_ids[:, :-2], use_cache=True).cache
            steps = [decoder_logits(model, batch, decoder_ids[:, [i]], cache=cache).logits for i in (4, 5)]
        assert_close(torch.cat(steps, dim=1), full[:, 4:], f"{attn_implementation}: cached steps vs one forward")

    settings = dict(
        max_new_tokens=6, min_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    prompt = batch if model.config.is_encoder_decoder else {"input_ids": batch["input_ids"][:1]}
    with torch.no_grad():
        uncached = model.generate(**prompt, **settings, use_cache=False)
        for cache_settings in ({}, {"cache_implementation": "static"}):
            cached = model.generate(**prompt, **settings, **cache_settings)
            assert torch.equal(cached.sequences, uncached.sequences), cache_settings
            for step, (score, expected) in enumerate(zip(cached.scores, uncached.scores)):
                assert_close(score, expected, f"{cache_settings}, scores of step {step}")


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("model_class, shape, plan", HEADLESS_LAYER_0, ids=["encoder_decoder", "decoder"])
def test_the_cache_of_a_decoder_whose_first_layer_lost_all_heads_continues_decoding(
    model_class, shape, plan, num_beams
):
    """transformers' generate() reads the positions cached in layer 0, and beam search expands the batch by that
    layer's length: the cache that generate() and the model's forward return must count them there too, or a
    generation continued on it re-feeds (and misnumbers) the positions cached. Continuing on either gives the tokens
    of, and scores within TOLERANCE of, a generation from scratch on the whole sequence."""
    model = build(model_class, shape, type_vocab_size=0, initializer_range=0.2)
    model.prune_heads(plan)
    batch = padded_batch((7, 5))
    is_encoder_decoder = model.config.is_encoder_decoder
    prompt = batch if is_encoder_decoder else {"input_ids": batch["input_ids"][:1]}
    settings = dict(
        max_new_tokens=4, min_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        first = model.generate(**prompt, **settings)
        sequence = first.sequences

        def decoded(ids: torch.Tensor) -> dict:
            if not is_encoder_decoder:
                return {"input_ids": ids}
            # The decoder's mask tells generate() that the decoder inputs include the positions cached.
            return {**prompt, "decoder_input_ids": ids, "decoder_attention_mask": torch.ones_like(ids)}

        # A caller's own prefill: a forward over all but the last token, whose cache generate() continues.
        prefilled = model(**decoded(sequence[:, :-1]), use_cache=True).cache
        expected = model.generate(**decoded(sequence), **settings, num_beams=num_beams)
        for source, cache in {"generate": first.cache, "forward": prefilled}.items():
            assert cache.get_seq_length() == sequence.shape[1] - 1, source
            cache.batch_repeat_interleave(num_beams)  # generate() takes a caller's cache expanded to the beams
            actual = model.generate(**decoded(sequence), **settings, num_beams=num_beams, cache=cache)
            assert torch.equal(actual.sequences, expected.sequences), source
            for step, (score, expected_score) in enumerate(zip(actual.scores, expected.scores, strict=True)):
                torch.testing.assert_close(
                    score, expected_score, rtol=0, atol=TOLERANCE, msg=lambda m: f"{source}, step {step}: {m}"
                )


@pytest.mark.parametrize(
    "model_class, shape",
    [(SelfAttnForConditionalGeneration, "encoder_decoder"), (SelfAttnForCausalLM, "decoder")],
    ids=["encoder_decoder", "decoder"],
)
def test_a_decoder_without_any_self_attention_head_refuses_a_cache(model_class, shape):
    """No cache layer counts positions then: decoding needs use_cache=False, and gives the zeroed model's tokens."""
    model = build(model_class, shape, type_vocab_size=0, initializer_range=0.2)
    plan = {f"decoder.{layer}": [0, 1, 2, 3] for layer in range(model.config.decoder_layers)}
    pruned, reference = pruned_and_reference(model, plan)
    batch = padded_batch((7, 5))
    prompt = batch if model.config.is_encoder_decoder else {"input_ids": batch["input_ids"][:1]}
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        for cache_settings in ({}, {"cache_implementation": "static"}):
            with pytest.raises(ValueError, match=r"every self-attention layer.*lost all its heads.*use_cache=False"):
                pruned.generate(**prompt, **settings, **cache_settings)
        decoder_ids = torch.randint(3, 99, (2, 4))
        first = decoder_logits(pruned, batch, decoder_ids, use_cache=True)  # a cache of its own, from no past
        assert_close(first.logits, decoder_logits(reference, batch, decoder_ids).logits, "without a past")
        with pytest.raises(ValueError, match="cache: every self-attention layer"):
            decoder_logits(pruned, batch, decoder_ids[:, :1], cache=first.cache)
        generated = pruned.generate(**prompt, **settings, use_cache=False)
    assert torch.equal(generated, reference.generate(**prompt, **settings))


def test_a_pruned_model_trains():
    from transformers import Trainer, TrainingArguments

    model = build(SelfAttnForSequenceClassification, num_labels=3)
    model.prune_heads(ENCODER_PLAN)
    model.train()
    batch = {**padded_batch(), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    loss = model(**batch).loss
    loss.backward()
    q_proj = attention(model, "encoder.0").q_proj
    assert q_proj.weight.grad.shape == q_proj.weight.shape and q_proj.weight.grad.abs().sum() > 0
    model.zero_grad()

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, index):
            return {key: value[index] for key, value in batch.items()}

    before = q_proj.weight.detach().clone()
    arguments = TrainingArguments(
        output_dir="unused", max_steps=2, per_device_train_batch_size=3, learning_rate=1e-2, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    result = Trainer(model=model, args=arguments, train_dataset=Rows()).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(q_proj.weight, before)


# --- saving, reloading, remote code, export --------------------------------------------------------------------


def test_pruned_model_saves_and_reloads(tmp_path):
    model = build(SelfAttnForSequenceClassification, num_labels=3)
    pruned, reference = pruned_and_reference(model, ENCODER_PLAN)
    pruned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["pruned_heads"] == {"encoder.0": [1, 3], "encoder.1": [0, 1, 2, 3]}
    reloaded, info = SelfAttnForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert attention(reloaded, "encoder.0").kept_heads == [0, 2]
    batch = padded_batch()
    assert_close(classifier_outputs(reloaded.eval(), batch), classifier_outputs(reference, batch), "reloaded")
    # and prunes on from where it was
    reloaded.prune_heads({0: [0]})
    assert reloaded.config.pruned_heads["encoder.0"] == [0, 1, 3]


def test_pruned_models_load_as_remote_code(tmp_path):
    classifier = build(SelfAttnForSequenceClassification, num_labels=3)
    classifier, classifier_reference = pruned_and_reference(classifier, ENCODER_PLAN)
    translator = build(SelfAttnForConditionalGeneration, "encoder_decoder", type_vocab_size=0)
    translator, translator_reference = pruned_and_reference(translator, SEQ2SEQ_PLAN)
    encoder_batch = padded_batch((7, 5))
    seq2seq_batch = {**encoder_batch, "decoder_input_ids": torch.randint(3, 99, (2, 4))}
    cases = {}
    for name, model, auto_class, batch in (
        ("classifier", classifier, "AutoModelForSequenceClassification", encoder_batch),
        ("translator", translator, "AutoModelForSeq2SeqLM", seq2seq_batch),
    ):
        model.save_pretrained(tmp_path / name)
        cases[name] = {"auto_class": auto_class, "folder": tmp_path / name, "inputs": batch}
    loaded = load_without_package(cases, tmp_path)
    assert loaded["classifier"]["module"].startswith("transformers_modules")
    with torch.no_grad():
        expected_classifier = classifier_reference(**encoder_batch).logits
        expected_translator = translator_reference(**seq2seq_batch).logits
    assert_close(loaded["classifier"]["outputs"]["logits"], expected_classifier, "remote classifier")
    assert_close(loaded["translator"]["outputs"]["logits"], expected_translator, "remote translator")


def test_export_refuses_a_pruned_model_and_names_the_pruned_layers(tmp_path):
    model = build(SelfAttnForSequenceClassification, num_labels=3)
    model.prune_heads({})  # nothing pruned: still exportable
    model.prune_heads({1: []})
    model.save_pretrained(tmp_path / "whole")
    config, _, report = export_checkpoint(tmp_path / "whole")
    assert config.architectures == ["BertForSequenceClassification"] and not report.problems()
    model.prune_heads({1: [2]})
    model.save_pretrained(tmp_path / "pruned")
    with pytest.raises(ConversionError, match=r"encoder\.1: heads \[2\].*cannot express pruned heads"):
        export_checkpoint(tmp_path / "pruned")


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,plan,error,message",
    [
        ("encoder", {2: [0]}, ValueError, r"key 2: layer out of range.*layers 0\.\.1"),
        ("encoder", {0: [4]}, ValueError, r"heads \[4\] out of range.*0\.\.3"),
        ("encoder", {0: [-1]}, ValueError, r"heads \[-1\] out of range"),
        ("encoder", {0: [1, 1]}, ValueError, r"lists heads \[1\] more than once"),
        ("encoder", {"encoder.7": [0]}, ValueError, r"'encoder\.7' names no attention.*'encoder\.0', 'encoder\.1'"),
        ("encoder", {"decoder.0": [0]}, ValueError, r"'decoder\.0' names no attention"),
        ("encoder", {0: [1], "encoder.0": [2]}, ValueError, r"names the attention 'encoder\.0' twice"),
        ("encoder", {0: 1}, TypeError, r"must be a list of head indices"),
        ("encoder", {0: ["1"]}, TypeError, r"non-integer heads \['1'\]"),
        ("encoder", {True: [1]}, TypeError, r"keys are layer indices"),
        ("encoder", [(0, [1])], TypeError, r"heads_to_prune must be a dict"),
        ("encoder_decoder", {0: [1]}, ValueError, r"encoder-decoder.*'encoder\.L', 'decoder\.L'"),
        ("decoder", {"decoder.0.cross_attn": [1]}, ValueError, r"names no attention"),
    ],
)
def test_bad_plans_are_refused_and_change_nothing(shape, plan, error, message):
    model = build(SelfAttnModel, shape)
    before = {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}
    with pytest.raises(error, match=message):
        model.prune_heads(plan)
    assert model.config.pruned_heads is None
    assert {name: tuple(parameter.shape) for name, parameter in model.named_parameters()} == before


def test_already_pruned_heads_are_refused():
    model = build(SelfAttnModel)
    model.prune_heads({0: [1]})
    with pytest.raises(ValueError, match=r"heads \[1\] of 'encoder\.0' are already pruned.*\[1\]"):
        model.prune_heads({0: [0, 1]})
    assert model.config.pruned_heads == {"encoder.0": [1]} and attention(model, "encoder.0").kept_heads == [0, 2, 3]


def test_a_submodule_prunes_only_what_it_holds():
    model = build(SelfAttnForConditionalGeneration, "encoder_decoder", type_vocab_size=0)
    with pytest.raises(ValueError, match=r"names \['decoder\.0'\], which this SelfAttnEncoder does not hold"):
        model.model.encoder.prune_heads({"decoder.0": [1]})
    model.model.encoder.prune_heads({"encoder.0": [1]})
    assert model.config.pruned_heads == {"encoder.0": [1]}


@pytest.mark.parametrize(
    "pruned_heads,message",
    [
        ({"encoder.2": [0]}, r"pruned_heads has the key 'encoder\.2'"),
        ({"encoder.0": [4]}, r"pruned_heads\['encoder\.0'\] = \[4\]"),
        ({"encoder.0": [2, 1]}, r"distinct heads in increasing order"),
    ],
)
def test_config_refuses_impossible_pruned_heads(pruned_heads, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_config("encoder", pruned_heads=pruned_heads)


def test_quantized_or_wrapped_projections_are_refused():
    model = build(SelfAttnModel)
    module = attention(model, "encoder.0")
    module.q_proj = torch.nn.Sequential(module.q_proj)  # stands for an adapter wrapper (e.g. a PEFT LoRA layer)
    with pytest.raises(TypeError, match=r"q_proj of attention 'encoder\.0' is a Sequential with no weight.*Prune"):
        model.prune_heads({0: [1]})


# --- importance --------------------------------------------------------------------------------------------------


def labelled_batches(num_batches=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(num_batches):
        batch = padded_batch((9, 5, 7), seed=seed + index)
        batches.append({**batch, "labels": torch.randint(0, 3, (3,), generator=generator)})
    return batches


def test_importance_shape_normalisation_and_no_side_effects():
    model = build(SelfAttnForSequenceClassification, num_labels=3).train()
    importance = head_importance(model, labelled_batches())
    assert importance.shape == (2, 4) and importance.dtype == torch.float32
    assert torch.all(importance > 0)
    assert_close(importance.norm(dim=-1), torch.ones(2), "unit L2 per layer")
    assert model.training  # mode restored
    assert all(parameter.grad is None for parameter in model.parameters())  # .grad left alone
    assert not any(module.o_proj._forward_pre_hooks for module in attention_modules_of(model))  # gates removed


def test_importance_is_the_gate_gradient():
    """Against a central finite difference of the loss in each head's scale, in float64."""
    model = build(SelfAttnForSequenceClassification, num_labels=3).double()
    (batch,) = labelled_batches(1)
    importance = head_importance(model, [batch], normalize_layers=False)

    def loss_with_scale(layer, head, scale):
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            attention(scaled, f"encoder.{layer}").o_proj.weight[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] *= scale
            return float(scaled(**batch).loss)

    step = 1e-5
    for layer, head in ((0, 0), (0, 3), (1, 2)):
        derivative = (loss_with_scale(layer, head, 1 + step) - loss_with_scale(layer, head, 1 - step)) / (2 * step)
        assert abs(float(importance[layer, head]) - abs(derivative)) <= 1e-6 * max(1.0, abs(derivative))


def test_a_head_whose_output_is_zero_has_importance_zero_and_pruned_heads_none():
    model = build(SelfAttnForSequenceClassification, num_labels=3)
    silent = attention(model, "encoder.1")
    with torch.no_grad():  # head 2 of layer 1 outputs zeros: its values are zero
        silent.v_proj.weight[2 * HEAD_DIM : 3 * HEAD_DIM] = 0
        silent.v_proj.bias[2 * HEAD_DIM : 3 * HEAD_DIM] = 0
    model.prune_heads({0: [1]})
    importance = head_importance(model, labelled_batches())
    assert importance[1, 2] == 0
    assert torch.isnan(importance[0, 1]) and not torch.isnan(importance).sum() > 1
    others = importance.clone()
    others[1, 2] = others[0, 1] = 1.0
    assert torch.all(others > 0)


def test_importance_of_decoder_and_cross_attention():
    model = build(SelfAttnForConditionalGeneration, "encoder_decoder", type_vocab_size=0)
    batch = {**padded_batch((7, 5)), "labels": torch.randint(3, 99, (2, 4))}
    for kind in ("encoder", "decoder", "cross_attn"):
        importance = head_importance(model, [batch], attention=kind)
        assert importance.shape == (2, 4) and torch.all(importance > 0), kind
    with pytest.raises(ValueError, match="attention='cross' is not one of"):
        head_importance(model, [batch], attention="cross")


def test_importance_needs_a_loss():
    model = build(SelfAttnForSequenceClassification, num_labels=3)
    with pytest.raises(ValueError, match="no loss.*labels"):
        head_importance(model, [padded_batch()])
    with pytest.raises(ValueError, match="got no batches"):
        head_importance(model, [])


@pytest.mark.parametrize("keep_float32", [None, ["*.o_proj"]], ids=["defaults", "float32_o_proj"])
def test_importance_of_an_int8_model_is_refused_by_name(keep_float32):
    """int8 layers have no backward, so no gradient reaches the gates; it failed with "'function' object has no
    attribute 'device'" (an int8 o_proj's weight), or where o_proj stays float32, in the first int8 layer below it."""
    model = build(SelfAttnForSequenceClassification, num_labels=3)
    model.quantize("int8", keep_float32=keep_float32)
    with pytest.raises(
        ValueError,
        match=r"^head_importance: SelfAttnForSequenceClassification holds int8 layers \(model\.encoder\.layers\.0\."
        r".* and \d+ more\) from model\.quantize\('int8'\), whose kernels have no backward.*Score the float32 model",
    ):
        head_importance(model, labelled_batches())
    assert not any(module.o_proj._forward_pre_hooks for module in attention_modules_of(model))  # no gate left


@pytest.mark.parametrize("max_batches", [0, -1, 1.0, True, "2"])
def test_importance_refuses_a_max_batches_that_is_no_count_of_batches(max_batches):
    model = build(SelfAttnForSequenceClassification, num_labels=3)
    batch = padded_batch()
    batch["labels"] = torch.zeros(len(batch["input_ids"]), dtype=torch.long)
    with pytest.raises(ValueError, match=rf"^max_batches={max_batches!r}: pass an integer >= 1"):
        head_importance(model, [batch], max_batches=max_batches)


def test_least_important_heads_ranks_across_layers_and_skips_pruned():
    importance = torch.tensor([[0.5, float("nan"), 0.1, 0.9], [0.2, 0.05, 0.7, 0.3]])
    assert least_important_heads(importance, 3, "encoder") == {"encoder.0": [2], "encoder.1": [0, 1]}
    assert least_important_heads(importance, 3) == {0: [2], 1: [0, 1]}  # not head_importance's: layer indices
    assert least_important_heads(importance, 1, "cross_attn") == {"decoder.1.cross_attn": [1]}
    assert least_important_heads(importance, 0) == {}
    with pytest.raises(ValueError, match="between 0 and the 7 heads left"):
        least_important_heads(importance, 8)
    for num_heads in (2.0, True):  # True is no count of heads, though it is an int
        with pytest.raises(ValueError, match=rf"^num_heads={num_heads!r}: choose an integer between 0 and the 7"):
            least_important_heads(importance, num_heads)


def test_a_plan_prunes_the_attention_whose_importance_it_ranks():
    model = build(SelfAttnForConditionalGeneration, "encoder_decoder", type_vocab_size=0)
    batch = {**padded_batch((7, 5)), "labels": torch.randint(3, 99, (2, 4))}
    keys = {"decoder": "decoder.{}", "encoder": "encoder.{}", "cross_attn": "decoder.{}.cross_attn"}
    for kind, key in keys.items():
        importance = head_importance(model, [batch], attention=kind)
        plan = least_important_heads(importance, 3)
        assert set(plan) <= {key.format(layer) for layer in (0, 1)}, kind
        pruned = copy.deepcopy(model)
        pruned.prune_heads(plan)
        assert pruned.config.pruned_heads == plan
        assert importance.attention == kind
    with pytest.raises(ValueError, match=r"attention='encoder', but this importance is of the 'cross_attn' attention"):
        least_important_heads(importance, 3, "encoder")
    # A tensor computed from it records no attention: its layer indices are refused by an encoder-decoder.
    with pytest.raises(ValueError, match="encoder-decoder model has several attentions per layer index"):
        model.prune_heads(least_important_heads(importance * 2, 3))

    causal = build(SelfAttnForCausalLM, "decoder", type_vocab_size=0)
    tokens = padded_batch((7, 5))["input_ids"]
    plan = least_important_heads(head_importance(causal, [{"input_ids": tokens, "labels": tokens}]), 2)
    assert set(plan) <= {"decoder.0", "decoder.1"}
    causal.prune_heads(plan)
    assert causal.config.pruned_heads == plan


def test_pruning_by_importance_end_to_end():
    model = build(SelfAttnForSequenceClassification, num_labels=3)
    plan = least_important_heads(head_importance(model, labelled_batches()), 5)
    model.prune_heads(plan)
    assert sum(len(heads) for heads in model.config.pruned_heads.values()) == 5
    assert model.config.pruned_heads == plan


# --- visualisation -----------------------------------------------------------------------------------------------


def png_size(path):
    import matplotlib.image

    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_importance_heatmap_is_written(tmp_path):
    importance = torch.tensor([[0.5, float("nan"), 0.1, 0.9], [0.2, 0.05, 0.7, 0.3]])
    viz.plot_head_importance(importance, tmp_path / "importance.png")
    assert png_size(tmp_path / "importance.png")[0] > 100


@pytest.fixture
def tokenizer():
    from transformers import BertTokenizerFast

    words = "the a cat dog sat on mat movie was good bad not very and".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    return BertTokenizerFast(vocab={word: index for index, word in enumerate(vocab)})


def test_command_line_importance_and_a_pruned_models_attention(tokenizer, tmp_path):
    config = SelfAttnConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4, encoder_layers=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, id2label={0: "negative", 1: "positive"},
    )
    torch.manual_seed(0)
    model = SelfAttnForSequenceClassification(config)
    model.prune_heads({0: [1], 1: [0, 1, 2, 3]})
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "labelled.tsv"
    data.write_text("sentence\tlabel\nthe movie was good\t1\nthe movie was bad\tnegative\na cat sat on the mat\t0\n")
    out = tmp_path / "out"
    assert viz.main([str(tmp_path / "model"), "--layer", "all", "--importance", str(data), "--out", str(out)]) == 0
    assert png_size(out / "head_importance.png")[0] > 100
    numbers = json.loads((out / "head_importance.json").read_text())
    assert numbers["texts"] == 3 and numbers["importance"][0][1] is None and numbers["importance"][1] == [None] * 4
    attention_numbers = json.loads((out / "attention.json").read_text())
    assert all(cell is None for head in attention_numbers["attentions"]["1"] for row in head for cell in row)
    assert attention_numbers["attentions"]["0"][1][0][0] is None and attention_numbers["attentions"]["0"][0][0][0] > 0
    data.write_text("the movie was good\tmaybe\n")
    assert viz.main([str(tmp_path / "model"), "--importance", str(data), "--out", str(out)]) == 2


# --- the example -------------------------------------------------------------------------------------------------


def test_prune_heads_example_runs_on_a_tiny_classifier(tokenizer, tmp_path, monkeypatch, capsys):
    import importlib
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "examples"))
    example = importlib.import_module("prune_heads")
    config = SelfAttnConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4, encoder_layers=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, id2label={0: "0", 1: "1"},
    )
    torch.manual_seed(0)
    SelfAttnForSequenceClassification(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    sentences = ["the movie was good", "the movie was not good", "a cat sat on the mat", "the dog was very bad"]
    rows = [f"{sentence}\t{index % 2}" for index, sentence in enumerate(sentences * 3)]
    for name in ("train", "dev"):
        (tmp_path / f"{name}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    results = example.main([
        "--model", str(tmp_path / "model"), "--train_file", str(tmp_path / "train.tsv"),
        "--validation_file", str(tmp_path / "dev.tsv"), "--output_dir", str(tmp_path / "out"),
        "--skip_train_rows", "2", "--importance_samples", "8", "--importance_batch_size", "4", "--batch_size", "5",
        "--random_seeds", "0,1", "--speed_runs", "1", "--fine_tune_steps", "1",
    ])
    assert [(row["method"], row["heads_pruned"]) for row in results["rows"]] == [
        ("none", 0), ("importance", 2), ("random", 2), ("random", 2), ("importance", 4), ("random", 4), ("random", 4)
    ]
    assert all(0 <= row["accuracy"] <= 1 and row["sentences_per_second"] > 0 for row in results["rows"])
    assert results["validation_sentences"] == 12 and (tmp_path / "out" / "head_importance.png").exists()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"][1]["pruned_heads"]
    assert "| 50% (4 of 8) | random, 2 seeds |" in capsys.readouterr().out
    sys.modules.pop("prune_heads", None)


@pytest.fixture
def prune_heads_example(monkeypatch):
    import importlib
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "examples"))
    yield importlib.import_module("prune_heads")
    sys.modules.pop("prune_heads", None)


PRUNE_REFUSALS = {
    # A negative count sliced the training file from its end.
    "negative_skip": (["--skip_train_rows", "-4"], "--skip_train_rows must be at least 0, got -4"),
    # Trained no steps, while results.json recorded -3.
    "negative_steps": (["--fine_tune_steps", "-3"], "--fine_tune_steps must be at least 0, got -3"),
    "rate_without_steps": (
        ["--fine_tune_learning_rate", "1e-4"],
        "--fine_tune_learning_rate applies only to the fine-tune after pruning, which --fine_tune_steps 0 (the "
        "default) skips; add --fine_tune_steps N, or leave out --fine_tune_learning_rate.",
    ),
    "negative_rate": (
        ["--fine_tune_steps", "2", "--fine_tune_learning_rate", "-1"],
        "--fine_tune_learning_rate must be a number above 0, got -1.0; e.g. --fine_tune_learning_rate 2e-05.",
    ),
    "nan_rate": (
        ["--fine_tune_steps", "2", "--fine_tune_learning_rate", "nan"],
        "--fine_tune_learning_rate must be a number above 0, got nan",
    ),
}


@pytest.mark.parametrize("case", PRUNE_REFUSALS)
def test_prune_heads_example_refuses_numbers_before_any_work(case, prune_heads_example, tmp_path, capsys):
    options, message = PRUNE_REFUSALS[case]
    with pytest.raises(SystemExit) as exit_info:
        prune_heads_example.main([
            "--model", str(tmp_path / "model"), "--train_file", str(tmp_path / "train.tsv"),
            "--validation_file", str(tmp_path / "dev.tsv"), "--output_dir", str(tmp_path / "out"), *options,
        ])  # fmt: skip
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prune_heads_example_fine_tunes_at_the_default_rate_unless_told(prune_heads_example):
    required = ["--train_file", "t.tsv", "--validation_file", "d.tsv"]
    assert prune_heads_example.parse_arguments([*required, "--fine_tune_steps", "3"]).fine_tune_learning_rate == 2e-5
    given = ["--fine_tune_steps", "3", "--fine_tune_learning_rate", "1e-3"]
    assert prune_heads_example.parse_arguments([*required, *given]).fine_tune_learning_rate == 1e-3
