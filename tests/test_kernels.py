"""kernels.Linear: CPU float32 inference on oneDNN against nn.Linear's own kernel ("aten"), and the default ("auto")
that times both once per shape, on tiny random models (float32, tolerance 1e-5: the kernels sum in another order).
Generated tokens must be identical; the models that generate have large weights (initializer_range=0.2) so that
their logits are far from ties. Where a test needs "auto" to pick a given kernel, the timing is replaced by one that
reports that kernel faster (the real timing runs in every other test of the suite, whose models use "auto").
Which kernel ran is checked by counting oneDNN calls, not by exact outputs: copies of a model may round differently
on another CPU. Under bfloat16 autocast the tolerance is BF16_TOLERANCE."""

import contextlib
import copy
import gc
import io
import types

import pytest
import torch
from batch_helpers import TOLERANCE, assert_same_weights, build, padded_batch

import modeling_selfattn.kernels as kernels
from modeling_selfattn import (
    SelfAttnForCausalLM,
    SelfAttnForConditionalGeneration,
    SelfAttnForMaskedLM,
    SelfAttnModel,
)
from modeling_selfattn.kernels import set_linear_kernel
from modeling_selfattn.packing import PackedSequences

BF16_TOLERANCE = 3e-2

needs_onednn = pytest.mark.skipif(
    not kernels.ONEDNN_AVAILABLE, reason="oneDNN runs on x86 CPUs with a oneDNN build of torch only"
)


@pytest.fixture
def onednn_calls(monkeypatch) -> list:
    calls = []
    original = kernels.onednn_linear
    monkeypatch.setattr(kernels, "onednn_linear", lambda *args: calls.append((*args[1].shape, *args[3:])) or original(*args))
    return calls


@pytest.fixture
def auto_finds_faster(monkeypatch):
    """Call with "onednn" or "aten": from then on, "auto" chooses afresh (an empty record of choices) and its timing
    reports that kernel the faster. Returns the list of timings made, one list of kernel names each."""
    timings = []

    def choose(faster: str) -> list:
        monkeypatch.setattr(kernels, "_chosen_kernels", {})
        real_timing = kernels.time_kernels

        def reported(runs):
            timings.append(sorted(runs))
            seconds, outputs = real_timing(runs)
            return {name: 1.0 if name == faster else 2.0 for name in seconds}, outputs

        monkeypatch.setattr(kernels, "time_kernels", reported)
        return timings

    return choose


def aten_copy(model):
    return set_linear_kernel(copy.deepcopy(model), "aten")


def max_output_diff(first, second) -> float:
    return max(
        (value - second[name]).abs().max().item()
        for name, value in first.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point()
    )


def test_every_linear_of_the_model_chooses_its_kernel():
    for model_class, shape in ((SelfAttnForMaskedLM, "encoder"), (SelfAttnForConditionalGeneration, "encoder_decoder")):
        model = build(model_class, shape)
        assert not any(type(module) is torch.nn.Linear for module in model.modules())
        assert all(module.kernel == "auto" for module in model.modules() if isinstance(module, kernels.Linear))


@needs_onednn
@pytest.mark.parametrize(
    "model_class, shape",
    [(SelfAttnForMaskedLM, "encoder"), (SelfAttnForConditionalGeneration, "encoder_decoder"),
     (SelfAttnForCausalLM, "decoder")],
)
@pytest.mark.parametrize("kernel", ["auto", "onednn", "onednn-packed"])
def test_onednn_inference_matches_the_aten_kernel(model_class, shape, kernel, onednn_calls, auto_finds_faster):
    auto_finds_faster("onednn")
    model = set_linear_kernel(build(model_class, shape, type_vocab_size=0), kernel)
    plain = aten_copy(model)
    batch = padded_batch(lengths=(12, 7, 4))
    if shape == "encoder_decoder":
        batch.update(decoder_input_ids=batch["input_ids"][:, :5])
    for mode in (torch.no_grad, torch.inference_mode):
        onednn_calls.clear()
        with mode():
            expected = plain(**batch)
            assert not onednn_calls
            assert max_output_diff(expected, model(**batch)) <= TOLERANCE
            assert onednn_calls, "oneDNN never ran: the comparison above proves nothing"
    assert plain.state_dict().keys() == model.state_dict().keys()


@needs_onednn
@pytest.mark.parametrize("kernel", ["onednn", "onednn-packed"])
def test_a_forced_onednn_kernel_runs_on_every_row_count(kernel, onednn_calls):
    layer = set_linear_kernel(kernels.Linear(64, 32), kernel)
    plain = aten_copy(layer)
    with torch.no_grad():
        for rows in (1, 3, kernels.ONEDNN_MIN_ROWS):
            torch.testing.assert_close(layer(torch.ones(rows, 64)), plain(torch.ones(rows, 64)), rtol=0, atol=TOLERANCE)
    assert len(onednn_calls) == 3


@needs_onednn
@pytest.mark.parametrize("faster", ["onednn", "aten"])
@pytest.mark.parametrize("kernel", ["auto", "auto-packed"])
def test_auto_times_few_row_calls_too(kernel, faster, onednn_calls, auto_finds_faster):
    """Decoding's one-row products are timed like any shape (which kernel wins there depends on the CPU); a compiled
    graph that finds no choice yet keeps nn.Linear's kernel below ONEDNN_MIN_ROWS rows, oneDNN from there."""
    timings = auto_finds_faster(faster)
    layer = set_linear_kernel(kernels.Linear(64, 32), kernel)
    plain = aten_copy(layer)
    packed = kernel == "auto-packed"
    inputs = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    assert layer.compiled_choice(inputs, "none", packed) == "aten"
    assert layer.compiled_choice(torch.randn(kernels.ONEDNN_MIN_ROWS, 64), "none", packed) == "onednn"
    with torch.no_grad():
        torch.testing.assert_close(layer(inputs), plain(inputs), rtol=0, atol=TOLERANCE)  # timed
        assert onednn_calls and all(call[3] == packed for call in onednn_calls)
        onednn_calls.clear()
        torch.testing.assert_close(layer(inputs), plain(inputs), rtol=0, atol=TOLERANCE)  # the choice
    assert timings == [["aten", "onednn"]]
    assert layer.compiled_choice(inputs, "none", packed) == faster
    assert onednn_calls == ([(32, 64, "none", packed)] if faster == "onednn" else [])


def streamed_layer(kernel: str = "auto", out_features_less: int = 0) -> tuple[kernels.Linear, torch.nn.Linear]:
    """A selfattn Linear of 512 inputs whose weight holds STREAMED_WEIGHT_ELEMENTS floats (less `out_features_less`
    rows), on `kernel`, and an nn.Linear with the same parameters."""
    out_features = kernels.STREAMED_WEIGHT_ELEMENTS // 512 - out_features_less
    layer = set_linear_kernel(kernels.Linear(512, out_features), kernel)
    plain = torch.nn.Linear(512, out_features)
    plain.load_state_dict(layer.state_dict())
    return layer, plain


@needs_onednn
def test_a_large_weight_takes_onednn_from_four_rows_untimed(onednn_calls, auto_finds_faster):
    """A weight of STREAMED_WEIGHT_ELEMENTS floats (8 MB, an LM head's size) takes oneDNN on ONEDNN_STREAMED_MIN_ROWS
    to ONEDNN_MIN_ROWS - 1 rows without timing, which cannot judge it; fewer rows, and a smaller weight at the same
    rows, are timed. The result is nn.Linear's within float32 rounding."""
    timings = auto_finds_faster("aten")  # where "auto" times these calls, it chooses nn.Linear's kernel
    in_features = 512
    large, plain = streamed_layer()
    small, _ = streamed_layer(out_features_less=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for rows in range(kernels.ONEDNN_STREAMED_MIN_ROWS, kernels.ONEDNN_MIN_ROWS):
            inputs = torch.randn(rows, in_features, generator=generator)
            onednn_calls.clear()
            torch.testing.assert_close(large(inputs), plain(inputs), rtol=0, atol=TOLERANCE)
            assert len(onednn_calls) == 1
            small(inputs)
            buckets = {kernels.row_bucket(seen) for seen in range(kernels.ONEDNN_STREAMED_MIN_ROWS, rows + 1)}
            assert len(timings) == len(buckets)  # the small weight's only, once per row bucket (4; 5-7 take 8's)
        large(torch.randn(kernels.ONEDNN_STREAMED_MIN_ROWS - 1, in_features, generator=generator))
        assert len(timings) == 3


@needs_onednn
def test_few_rows_on_a_large_weight_keep_their_own_choice_and_fall_back_where_onednn_refuses(monkeypatch, onednn_calls):
    """Rows 5-7 round up to the 8-row bucket, which "auto" times; their untimed choice is recorded apart, so compiled
    graphs take the same kernel as eager calls. A shape oneDNN refuses takes nn.Linear's kernel, as with timing."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(kernels, "_chosen_kernels", {threads: {}})
    in_features = 512
    layer, plain = streamed_layer()
    kernels._chosen_kernels[threads][layer.timing_key(kernels.ONEDNN_MIN_ROWS, "none", False)] = "aten"  # 8 rows: MKL
    inputs = torch.randn(kernels.ONEDNN_MIN_ROWS - 1, in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(layer(inputs), plain(inputs), rtol=0, atol=TOLERANCE)
        assert len(onednn_calls) == 1
        assert kernels._chosen_kernels[threads][layer.timing_key(len(inputs), "none", False)] == "onednn"
        assert layer.compiled_choice(inputs, "none", False) == "onednn"
        assert layer.compiled_choice(torch.randn(kernels.ONEDNN_MIN_ROWS, in_features), "none", False) == "aten"

        refusals = []

        def refuse(*args):
            refusals.append(1)
            raise RuntimeError("oneDNN: unsupported shape")

        kernels._chosen_kernels[threads].clear()
        monkeypatch.setattr(kernels, "onednn_linear", refuse)
        for _ in range(2):  # the refusal is recorded: the second call does not try oneDNN again
            torch.testing.assert_close(layer(inputs), plain(inputs), rtol=0, atol=TOLERANCE)
        assert refusals == [1]
        assert kernels._chosen_kernels[threads] == {layer.timing_key(len(inputs), "none", False): "aten"}


@needs_onednn
def test_the_onednn_kernel_sees_weights_changed_through_data(onednn_calls):
    # PEFT merges adapters with `weight.data += delta`, which autograd's version counter does not see.
    layer = set_linear_kernel(kernels.Linear(16, 16), "onednn")
    inputs = torch.randn(16, 16)
    with torch.no_grad():
        layer(inputs)
        layer.weight.data += 1.0
        torch.testing.assert_close(layer(inputs), set_linear_kernel(copy.deepcopy(layer), "aten")(inputs))
        # The packed copy is made again when the kernel is set again, as its documentation says.
        set_linear_kernel(layer, "onednn-packed")(inputs)
        layer.weight.data += 1.0
        set_linear_kernel(layer, "onednn-packed")
        torch.testing.assert_close(layer(inputs), set_linear_kernel(copy.deepcopy(layer), "aten")(inputs))
    assert len(onednn_calls) == 4


@needs_onednn
@pytest.mark.parametrize("kernel", ["onednn", "auto"])
def test_a_bias_trained_alone_gets_its_gradient(kernel, auto_finds_faster):
    # BitFit, PEFT's bias="all": frozen weight, input without a gradient (from frozen embeddings), trainable bias.
    auto_finds_faster("onednn")
    layer = set_linear_kernel(kernels.Linear(16, 8), kernel)
    layer.weight.requires_grad_(False)
    plain = aten_copy(layer)
    inputs = torch.randn(10, 16)
    for module in (layer, plain):
        module(inputs).pow(2).sum().backward()
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad, rtol=TOLERANCE, atol=TOLERANCE)


@needs_onednn
def test_forward_mode_gradients_keep_nn_linears_path():
    layer = set_linear_kernel(kernels.Linear(16, 8), "onednn")
    tangent = torch.randn(4, 16)
    with torch.autograd.forward_ad.dual_level():
        output = layer(torch.autograd.forward_ad.make_dual(torch.randn(4, 16), tangent))
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(output).tangent, tangent @ layer.weight.t())


@needs_onednn
@pytest.mark.parametrize("shape", [(16, 16), (3, 5)], ids=["even", "odd"])  # fingerprints read as int64 or int32
def test_drop_changed_packed_weights_repacks_only_weights_changed_through_data(shape, onednn_calls):
    model = torch.nn.Sequential(kernels.Linear(shape[1], shape[0]), kernels.Linear(shape[1], shape[0]))
    set_linear_kernel(model, "onednn-packed")
    inputs = torch.randn(4, shape[1])
    with torch.no_grad():
        for layer in model:
            layer(inputs)
        unchanged = kernels.onednn_packed_weight(model[1].weight)
        model[0].weight.data[-1, -1] += 1e-3  # one element, which autograd does not see
        model[1].weight.data.copy_(model[1].weight.data.roll(1, 0))  # rows moved: the same values elsewhere
        kernels.drop_changed_packed_weights(model)
        for layer in model:
            torch.testing.assert_close(layer(inputs), aten_copy(layer)(inputs), rtol=0, atol=TOLERANCE)
        assert kernels.onednn_packed_weight(model[1].weight) is not unchanged
        layer_packed = kernels.onednn_packed_weight(model[0].weight)
        kernels.drop_changed_packed_weights(model)  # nothing changed since: the copies are kept
        assert kernels.onednn_packed_weight(model[0].weight) is layer_packed
    assert len(onednn_calls) == 4


@needs_onednn
@pytest.mark.parametrize("num_beams", [1, 3])
def test_onednn_inference_generates_the_same_tokens(num_beams, onednn_calls, auto_finds_faster):
    auto_finds_faster("onednn")
    model = build(
        SelfAttnForConditionalGeneration, "encoder_decoder", tie_word_embeddings=False, initializer_range=0.2,
        type_vocab_size=0,
    )
    batch = padded_batch(lengths=(12, 7, 4))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, num_beams=num_beams)
    expected = aten_copy(model).generate(**batch, **kwargs)
    assert not onednn_calls
    assert torch.equal(model.generate(**batch, **kwargs), expected)
    assert onednn_calls


@needs_onednn
@pytest.mark.parametrize("kernel", ["onednn", "auto"])
def test_training_on_onednn_matches_the_aten_kernel_and_inference_follows_weight_updates(
    kernel, onednn_calls, auto_finds_faster
):
    """A training step (forward, backward, optimizer) with every product on oneDNN ("auto" where its timing, here
    reported, finds oneDNN faster): loss and gradients equal nn.Linear's within float32 rounding; inference after the
    step reads the updated weights."""
    timings = auto_finds_faster("onednn")
    model = set_linear_kernel(build(SelfAttnForMaskedLM), kernel)
    plain = aten_copy(model)
    assert model.lm_head.decoder.weight is model.model.encoder.embeddings.word_embeddings.weight  # still tied
    batch = padded_batch(lengths=(12, 7, 4))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses, gradients = [], []
    for trained in (plain, model):
        trained.train()
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
        onednn_calls.clear()
        loss = trained(**batch, labels=labels).loss
        loss.backward()
        assert bool(onednn_calls) == (trained is model)
        gradients.append({name: parameter.grad.clone() for name, parameter in trained.named_parameters()})
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= TOLERANCE
    for name, expected in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], expected, rtol=TOLERANCE, atol=TOLERANCE, msg=name)
    assert all(kind == ["aten", "onednn"] for kind in timings) and (kernel == "onednn") == (not timings)
    for trained in (plain, model):
        trained.eval()
    with torch.no_grad():  # inference after the update uses the updated weights
        assert max_output_diff(plain(**batch), model(**batch)) <= TOLERANCE
        model.load_state_dict(build(SelfAttnForMaskedLM, seed=1).state_dict())
        assert max_output_diff(aten_copy(build(SelfAttnForMaskedLM, seed=1))(**batch), model(**batch)) <= TOLERANCE


@needs_onednn
def test_onednn_training_products_give_nn_linears_gradients_frozen_checkpointed_and_of_gradients(onednn_calls):
    layer = set_linear_kernel(kernels.Linear(64, 48), "onednn")
    plain = aten_copy(layer)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(3, 20, 64, generator=generator)
    grad_output = torch.randn(3, 20, 48, generator=generator)

    def gradients(module, frozen=False, checkpointed=False, of_gradients=False):
        module.zero_grad(set_to_none=True)
        module.weight.requires_grad_(not frozen)
        x = inputs.clone().requires_grad_()
        if checkpointed:
            output = torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
        else:
            output = module(x)
        if of_gradients:  # a penalty on the input's gradient: the backward itself differentiated
            (input_grad,) = torch.autograd.grad((output * grad_output).sum(), x, create_graph=True)
            input_grad.pow(2).sum().backward()
        else:
            output.backward(grad_output)
        module.weight.requires_grad_(True)
        return x.grad, module.weight.grad, module.bias.grad

    # oneDNN products: the output and both gradients; the input's only when frozen; the output twice when
    # checkpointed (recomputed); the output only when the backward is differentiated (torch's products then).
    for options, calls in (({}, 3), ({"frozen": True}, 2), ({"checkpointed": True}, 4), ({"of_gradients": True}, 1)):
        onednn_calls.clear()
        actual = gradients(layer, **options)
        assert len(onednn_calls) == calls, options
        for got, expected in zip(actual, gradients(plain, **options)):
            assert (got is None) == (expected is None), options
            if got is not None:
                torch.testing.assert_close(got, expected, rtol=TOLERANCE, atol=TOLERANCE, msg=str(options))


class WeightSubclass(torch.Tensor):
    pass


@needs_onednn
def test_tracing_exporting_autocast_and_quantised_weights_take_the_aten_kernel(onednn_calls):
    model = build(SelfAttnModel, add_pooling_layer=False)
    batch = padded_batch(lengths=(12, 12, 12))
    with torch.no_grad():
        exported = torch.export.export(model, (), dict(batch))
        assert not any("onednn" in str(node.target) for node in exported.graph.nodes)
        torch.jit.trace(model, (batch["input_ids"], batch["attention_mask"]), strict=False, check_trace=False)
        assert onednn_calls == []
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's casts apply, as to nn.Linear
            torch.testing.assert_close(
                model(**batch).last_hidden_state, aten_copy(model)(**batch).last_hidden_state, rtol=0,
                atol=BF16_TOLERANCE,
            )
        assert onednn_calls == []
        layer = set_linear_kernel(kernels.Linear(16, 16), "onednn")
        expected = layer(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
        assert len(onednn_calls) == 1
        # A weight of a tensor subclass (as quantisation back-ends install) goes to nn.Linear, which dispatches on it.
        layer.weight = torch.nn.Parameter(layer.weight.detach().as_subclass(WeightSubclass), requires_grad=False)
        torch.testing.assert_close(
            layer(torch.randn(16, 16, generator=torch.Generator().manual_seed(0))).as_subclass(torch.Tensor),
            expected, rtol=0, atol=TOLERANCE,
        )
        assert len(onednn_calls) == 1


@pytest.mark.parametrize("kernel", ["onednn", "auto"])
def test_a_parametrized_weight_takes_nn_linears_path(kernel, onednn_calls, auto_finds_faster):
    # A parametrization computes the weight at each call and leaves none registered: nn.Linear reads the computed one,
    # with autograd on or off, also where "auto" chose nn.Linear's kernel for the shape on another layer.
    auto_finds_faster("aten")
    with torch.no_grad():
        set_linear_kernel(kernels.Linear(16, 16), kernel)(torch.randn(4, 16))
    onednn_calls.clear()  # the other layer's (timing runs both kernels)
    layer = set_linear_kernel(kernels.Linear(16, 16), kernel)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Doubled())
    assert "weight" not in layer._parameters
    reference = torch.nn.Linear(16, 16)
    with torch.no_grad():
        reference.weight.copy_(2 * layer.parametrizations.weight.original)
        reference.bias.copy_(layer.bias)
    inputs = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(layer(inputs), reference(inputs), rtol=0, atol=0)
    torch.testing.assert_close(layer(inputs), reference(inputs), rtol=0, atol=0)
    assert onednn_calls == []


class Doubled(torch.nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


@needs_onednn
def test_kernels_copy_pickle_switch_and_leave_global_settings_alone(onednn_calls):
    settings = (torch.get_num_threads(), torch.backends.mkldnn.enabled, torch.get_float32_matmul_precision())
    model = set_linear_kernel(build(SelfAttnModel), "onednn")
    batch = padded_batch(lengths=(12, 7, 4))
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for other in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
            assert_same_weights(model, other)
            torch.testing.assert_close(other(**batch).last_hidden_state, expected, rtol=0, atol=TOLERANCE)
        calls = len(onednn_calls)
        set_linear_kernel(model, "aten")
        torch.testing.assert_close(model(**batch).last_hidden_state, expected, rtol=0, atol=TOLERANCE)
        assert len(onednn_calls) == calls
        with torch.backends.mkldnn.flags(enabled=False):  # the user's switch is obeyed
            set_linear_kernel(model, "onednn")(**batch)
        assert len(onednn_calls) == calls
        set_linear_kernel(model, "onednn")(**batch)
        assert len(onednn_calls) > calls, "oneDNN never ran: the checks above prove nothing"
    assert (torch.get_num_threads(), torch.backends.mkldnn.enabled, torch.get_float32_matmul_precision()) == settings


def test_auto_keeps_the_aten_kernel_where_onednn_was_not_measured(monkeypatch, onednn_calls):
    monkeypatch.setattr(kernels, "ONEDNN_AVAILABLE", False)
    with torch.no_grad():
        build(SelfAttnModel)(**padded_batch(lengths=(12, 7, 4)))
    assert onednn_calls == []


def test_an_unknown_kernel_is_refused():
    kernels_named = r"\('auto', 'auto-packed', 'onednn', 'onednn-packed', 'aten'\)"
    with pytest.raises(ValueError, match=rf"kernel='mkl' is not one of {kernels_named}"):
        set_linear_kernel(build(SelfAttnModel), "mkl")


def test_a_model_without_selfattn_linear_layers_is_refused():
    # nn.Linear is not selfattn's: the call would change nothing.
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"^Sequential has no selfattn Linear layer .* kernel='aten' would change nothing"):
        set_linear_kernel(model, "aten")


@needs_onednn
def test_onednn_packed_weights_are_freed_with_the_model():
    gc.collect()
    before = len(kernels._onednn_packed_weights)
    model = set_linear_kernel(build(SelfAttnModel, add_pooling_layer=False), "onednn-packed")
    with torch.no_grad():
        model(**padded_batch())
    assert len(kernels._onednn_packed_weights) == before + 6 * len(model.encoder.layers)  # q k v o fc1 fc2
    del model
    gc.collect()
    assert len(kernels._onednn_packed_weights) == before


@needs_onednn
@pytest.mark.parametrize("hidden_act, fused", [("gelu", "gelu"), ("relu", "relu"), ("gelu_python", None)])
def test_the_feed_forward_fuses_the_activations_onednn_computes_alike(hidden_act, fused, monkeypatch):
    model = set_linear_kernel(build(SelfAttnModel, hidden_act=hidden_act), "onednn")
    plain = aten_copy(model)
    batch = padded_batch(lengths=(12, 12, 12))
    activations = []
    original = kernels.onednn_linear
    monkeypatch.setattr(
        kernels, "onednn_linear", lambda *args: activations.append(args[3] if len(args) > 3 else "none") or original(*args)
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model(**batch).last_hidden_state, plain(**batch).last_hidden_state, rtol=0, atol=TOLERANCE
        )
        assert activations.count(fused) == (len(model.encoder.layers) if fused else 0)
        activations.clear()
        seen = []  # a hook on fc1 must see fc1's own output: that layer is not fused then
        model.encoder.layers[0].ffn.fc1.register_forward_hook(lambda module, args, output: seen.append(output))
        model(**batch)
        assert len(seen) == 1 and activations.count(fused) == (len(model.encoder.layers) - 1 if fused else 0)


@needs_onednn
def test_a_forward_bound_back_to_the_class_own_keeps_the_fast_paths(onednn_calls):
    """The `kernels` library's kernelize, which transformers' from_pretrained runs by default from 5.25 on, sets
    `module.forward = MethodType(type(module).forward, module)` on each layer it has no kernel for (GELUActivation
    on a CPU): that replaces nothing, and the fused feed-forward and the embedding of real tokens alone stay; a
    forward that wraps the module's is an observer, and they step aside."""
    model = set_linear_kernel(build(SelfAttnModel, hidden_act="gelu", add_pooling_layer=False), "onednn")
    plain = aten_copy(model)
    batch = padded_batch()
    layers = len(model.encoder.layers)

    def fused_activations_and_embeds_alone() -> tuple[int, bool]:
        onednn_calls.clear()
        with torch.no_grad():
            output = model(**batch).last_hidden_state
            expected = plain(**batch).last_hidden_state
            embeds_alone = PackedSequences.embeds_tokens_alone(model.encoder.embeddings, batch["input_ids"])
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(output[real], expected[real], rtol=0, atol=TOLERANCE)
        return [call[2] for call in onednn_calls].count("gelu"), embeds_alone

    assert fused_activations_and_embeds_alone() == (layers, True)
    for module in model.modules():
        module.forward = types.MethodType(type(module).forward, module)
    assert fused_activations_and_embeds_alone() == (layers, True)
    for module in model.modules():
        del module.forward
    activation = model.encoder.layers[0].ffn.activation
    activation.forward = lambda input, forward=activation.forward: forward(input)
    embedding_norm = model.encoder.embeddings.layer_norm
    embedding_norm.forward = lambda input, forward=embedding_norm.forward: forward(input)
    assert fused_activations_and_embeds_alone() == (layers - 1, False)


@needs_onednn
@pytest.mark.parametrize("faster", ["onednn", "aten"])
def test_auto_times_each_shape_once_and_keeps_the_faster_kernel(faster, onednn_calls, auto_finds_faster):
    timings = auto_finds_faster(faster)
    layer = kernels.Linear(64, 32)
    plain = set_linear_kernel(copy.deepcopy(layer), "aten")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for rows in (17, 20, 32, 25):  # one bucket (17-32 rows): timed on its first call only
            inputs = torch.randn(rows, 64, generator=generator)
            onednn_calls.clear()
            torch.testing.assert_close(layer(inputs), plain(inputs), rtol=0, atol=TOLERANCE)
        assert timings == [["aten", "onednn"]]
        assert bool(onednn_calls) == (faster == "onednn")  # after the choice, only the chosen kernel runs
        layer(torch.randn(33, 64, generator=generator))  # the next bucket is timed apart
        assert len(timings) == 2
        layer(torch.randn(1, 64, generator=generator))
        assert len(timings) == 3  # one row too: which kernel wins there depends on the CPU
        relu = torch.nn.ReLU()
        inputs = torch.randn(20, 64, generator=generator)
        # With the activation in the same pass it is another product: timed apart, and equal to the unfused one.
        fused = kernels.linear_then_activation(layer, relu, inputs)
        assert len(timings) == 4
        torch.testing.assert_close(fused, relu(plain(inputs)), rtol=0, atol=TOLERANCE)
        with thread_count(torch.get_num_threads() % 2 + 1):
            layer(inputs)  # the speeds depend on the thread count
        assert len(timings) == 5


@contextlib.contextmanager
def thread_count(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@needs_onednn
@pytest.mark.parametrize("faster", ["onednn", "aten"])
def test_auto_gives_the_aten_outputs_and_tokens_whichever_kernel_it_chose(faster, auto_finds_faster, onednn_calls):
    auto_finds_faster(faster)
    model = build(
        SelfAttnForConditionalGeneration, "encoder_decoder", tie_word_embeddings=False, initializer_range=0.2,
        type_vocab_size=0,
    )
    plain = aten_copy(model)
    batch = padded_batch(lengths=(12, 7, 4))
    with torch.no_grad():
        # The first call times and returns the chosen kernel's output, the second reuses the choice.
        for _ in range(2):
            onednn_calls.clear()
            outputs = model(**batch, decoder_input_ids=batch["input_ids"][:, :5])
            expected = plain(**batch, decoder_input_ids=batch["input_ids"][:, :5])
            assert max_output_diff(expected, outputs) <= TOLERANCE
        assert bool(onednn_calls) == (faster == "onednn")  # the second call: the chosen kernel only
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, num_beams=2)
    assert torch.equal(model.generate(**batch, **kwargs), plain.generate(**batch, **kwargs))


@pytest.mark.parametrize("min_seconds, timed_runs", [(0.0, kernels.MIN_TIMED_RUNS), (60.0, kernels.MAX_TIMED_RUNS)])
def test_the_real_timing_runs_each_kernel_until_it_has_run_long_enough(min_seconds, timed_runs, monkeypatch):
    monkeypatch.setattr(kernels, "MIN_TIMED_SECONDS", min_seconds)
    calls = []

    def run(name):
        calls.append(name)
        return torch.full((1,), float(len(calls)))

    seconds, outputs = kernels.time_kernels({"a": lambda: run("a"), "b": lambda: run("b")})
    assert calls == ["a", "b"] * (1 + timed_runs)  # one untimed run each, then alternating
    assert set(seconds) == {"a", "b"} and all(0 <= value < 1 for value in seconds.values())
    assert outputs["a"].item() == 2 * timed_runs + 1 and outputs["b"].item() == 2 * timed_runs + 2  # the last ones


@needs_onednn
def test_auto_leaves_a_shape_onednn_refuses_and_a_strided_bias_to_the_aten_kernel(monkeypatch, onednn_calls):
    monkeypatch.setattr(kernels, "_chosen_kernels", {})
    layer = kernels.Linear(64, 32)
    plain = set_linear_kernel(copy.deepcopy(layer), "aten")
    inputs = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))

    def refuse(*args):
        raise RuntimeError("oneDNN: unsupported shape")

    with torch.no_grad():
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "onednn_linear", refuse)
            torch.testing.assert_close(layer(inputs), plain(inputs), rtol=0, atol=TOLERANCE)
        assert list(kernels._chosen_kernels[torch.get_num_threads()].values()) == ["aten"]
        # oneDNN reads a bias that is a strided view as if it were contiguous: such a layer keeps nn.Linear's kernel.
        for model in (layer, plain):
            model.bias = torch.nn.Parameter(torch.randn(32, 2, generator=torch.Generator().manual_seed(1))[:, 0])
        forced = set_linear_kernel(layer, "onednn")
        onednn_calls.clear()
        torch.testing.assert_close(forced(inputs), plain(inputs), rtol=0, atol=TOLERANCE)
        assert onednn_calls == []


@needs_onednn
@pytest.mark.parametrize("faster", ["onednn", "aten"])
def test_compiled_graphs_take_the_choice_made_in_eager_mode(faster, auto_finds_faster):
    auto_finds_faster(faster)
    layer = kernels.Linear(64, 32)
    inputs = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module.graph)
        return graph_module.forward

    with torch.no_grad():
        layer(inputs)  # eager: times and chooses
        compiled = torch.compile(layer, backend=recording_backend, fullgraph=True)
        torch.testing.assert_close(compiled(inputs), layer(inputs), rtol=0, atol=TOLERANCE)
    targets = [str(node.target) for graph in graphs for node in graph.nodes]
    assert any("onednn_linear" in target for target in targets) == (faster == "onednn"), targets


@pytest.fixture
def in_place_activations(monkeypatch) -> list:
    """The activations applied in place on a product (linear_then_activation), by name, as they happen."""
    calls = []
    for name, original in list(kernels.ATEN_ACTIVATIONS.items()):
        recorded = lambda output, name=name, original=original: calls.append(name) or original(output)  # noqa: E731
        monkeypatch.setitem(kernels.ATEN_ACTIVATIONS, name, recorded)
    return calls


class CachedOutput(torch.nn.Module):
    """A layer whose output is a tensor it keeps: an activation must not overwrite it."""

    def __init__(self):
        super().__init__()
        self.kept = torch.randn(5, 8)

    def forward(self, input):
        return self.kept


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_activation_goes_in_place_only_on_a_fresh_unobserved_product(activation, in_place_activations):
    """Where oneDNN does not take the product (here: an nn.Linear, and an int8 layer), the feed-forward's activation
    overwrites the product in place when nothing else can hold it, with torch's own results to the bit; with a
    gradient, a hook that could keep the product, or a layer whose output is not its own, it runs as usual."""
    from transformers.activations import GELUActivation

    from modeling_selfattn.quantization import int8_linear

    module = GELUActivation() if activation == "gelu" else torch.nn.ReLU()
    function = torch.nn.functional.gelu if activation == "gelu" else torch.nn.functional.relu
    torch.manual_seed(0)
    linear, inputs = torch.nn.Linear(8, 16), torch.randn(5, 8)
    layers = {"linear": linear, "int8": int8_linear(linear, reduce_range=False, per_token=True)}
    for kind, layer in layers.items():
        with torch.no_grad():
            expected = function(layer(inputs))
            in_place_activations.clear()
            assert torch.equal(kernels.linear_then_activation(layer, module, inputs), expected), kind
        assert in_place_activations == [activation], kind
    # A gradient: the usual activation, and the gradient flows.
    in_place_activations.clear()
    output = kernels.linear_then_activation(linear, module, inputs)
    output.sum().backward()
    assert linear.weight.grad is not None and not in_place_activations
    # A hook may keep the product: it must still hold the product afterwards.
    kept = []
    handle = linear.register_forward_hook(lambda module, args, product: kept.append(product))
    with torch.no_grad():
        kernels.linear_then_activation(linear, module, inputs)
        assert torch.equal(kept[0], linear(inputs)) and not in_place_activations
    handle.remove()
    # Under autocast the activation runs as autocast has it.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = function(linear(inputs))
        assert torch.equal(kernels.linear_then_activation(linear, module, inputs), expected)
    assert not in_place_activations
    # A layer that returns a tensor it keeps.
    cached = CachedOutput()
    saved = cached.kept.clone()
    with torch.no_grad():
        assert torch.equal(kernels.linear_then_activation(cached, module, inputs), function(saved))
    assert torch.equal(cached.kept, saved) and not in_place_activations


@torch.no_grad()
def test_only_unobserved_selfattn_linears_and_evaluating_dropouts_read_and_drop():
    linear, dropout = kernels.Linear(8, 4), torch.nn.Dropout(0.1).eval()
    assert kernels.reads_and_drops((dropout, linear))
    assert not kernels.reads_and_drops((dropout.train(), linear))  # a dropout in training makes a new tensor
    dropout.eval()
    assert not kernels.reads_and_drops((dropout, torch.nn.Linear(8, 4)))  # another layer may keep what it reads
    for module in (dropout, linear):
        handle = module.register_forward_pre_hook(lambda module, args: None)
        assert not kernels.reads_and_drops((dropout, linear))  # a hook may keep it
        handle.remove()
    assert kernels.reads_and_drops((dropout, linear))
    with torch.enable_grad():
        assert not kernels.reads_and_drops((dropout, linear))  # its weight trains: autograd would keep the input
        linear.requires_grad_(False)
        assert kernels.reads_and_drops((dropout, linear))


@needs_onednn
def test_a_trained_fc2_after_a_frozen_fc1_gets_its_gradient(auto_finds_faster):
    """fc1 frozen, fc2 training, the model in evaluation mode: the first layer's fc1 (whose input needs no gradient)
    may run its inference kernel, but its output is fc2's saved input, so it must not be a scratch buffer that a
    later call overwrites before backward (here a second forward, as in accumulating two batches' losses). The
    gradients equal those of the plain path."""
    auto_finds_faster("aten")
    model = build(SelfAttnModel)
    plain = aten_copy(model)
    batches = [padded_batch(lengths=(12, 12)), padded_batch(lengths=(12, 12), seed=1)]
    gradients = []
    for copy_ in (model, plain):
        for name, parameter in copy_.named_parameters():
            parameter.requires_grad_(name.endswith(("fc2.weight", "fc2.bias")))
        with torch.no_grad():
            copy_(**batches[0])  # the kernel choice is made: later calls run the chosen kernel, not the timing
        sum(copy_(**batch).last_hidden_state.sum() for batch in batches).backward()
        gradients.append({name: p.grad for name, p in copy_.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys() and gradients[0]
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradient, gradients[1][name], rtol=0, atol=TOLERANCE)


@needs_onednn
def test_the_feed_forward_intermediate_goes_into_scratch_only_where_nothing_can_keep_it(auto_finds_faster):
    """Where "auto" runs fc1 on nn.Linear's kernel, the feed-forward's intermediate is written into this thread's
    scratch buffer, by the same kernel (outputs within TOLERANCE, identical tokens). A hook on fc2 that keeps its input makes it a
    fresh tensor, which the next layer's feed-forward then leaves as it was; with oneDNN's kernel it is oneDNN's own
    output."""
    from modeling_selfattn import scratch

    auto_finds_faster("aten")
    model = build(
        SelfAttnForConditionalGeneration, "encoder_decoder", tie_word_embeddings=False, initializer_range=0.2,
        type_vocab_size=0,
    )
    batch = padded_batch(lengths=(12, 12, 12))  # no padding: the padded path, 36 rows
    inputs = dict(**batch, decoder_input_ids=batch["input_ids"][:, :9])
    fresh = copy.deepcopy(model)
    for layer in fresh.modules():
        if isinstance(layer, torch.nn.Module) and hasattr(layer, "fc2"):
            layer.fc2.register_forward_hook(lambda module, args, output: None)  # observed: no scratch
    scratch.release()
    with torch.no_grad():
        expected = fresh(**inputs)
        assert scratch.held("ffn intermediate") is None
        outputs = model(**inputs)
    intermediate = scratch.held("ffn intermediate")
    assert intermediate is not None and intermediate.numel() == 36 * model.config.intermediate_size
    # The same kernel into other memory: identical bits on the Xeon measured; MKL may round by alignment elsewhere.
    assert max_output_diff(expected, outputs) <= TOLERANCE
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, num_beams=2)
    assert torch.equal(model.generate(**batch, **kwargs), fresh.generate(**batch, **kwargs))
    # A hook that keeps fc2's input: what it kept stays as it was through the rest of the forward.
    kept = []
    first_ffn = model.get_encoder().layers[0].ffn
    handle = first_ffn.fc2.register_forward_pre_hook(lambda module, args: kept.append((args[0], args[0].clone())))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    assert torch.equal(*kept[0])
    # oneDNN's kernel: its own output, no scratch.
    auto_finds_faster("onednn")
    scratch.release()
    with torch.no_grad():
        model(**inputs)
    assert scratch.held("ffn intermediate") is None
    scratch.release()


class PassThroughTensor(torch.Tensor):
    """A tensor subclass: results computed from it keep its type."""


@needs_onednn
def test_the_feed_forward_keeps_its_intermediate_fresh_under_transforms_subclasses_and_capture(auto_finds_faster):
    """No scratch buffer (so the computation is torch's usual one) under torch.func's vmap and jvp (which have no out=
    kernels), for a tensor subclass (whose type the output keeps) and where a tool replaced fc2's forward to capture
    its input (which must then still hold what fc2 read)."""
    from modeling_selfattn import scratch

    auto_finds_faster("aten")
    model = build(SelfAttnModel)
    ffn = model.get_encoder().layers[0].ffn
    inputs = torch.randn(2, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ffn(inputs[0])  # the kernel choice is made
        expected = torch.stack([ffn(sample) for sample in inputs])
        scratch.release()
        torch.testing.assert_close(torch.func.vmap(ffn)(inputs), expected, rtol=0, atol=TOLERANCE)
        tangent = torch.ones_like(inputs[0])
        output, derivative = torch.func.jvp(ffn, (inputs[0],), (tangent,))
        torch.testing.assert_close(output, expected[0], rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(derivative, torch.func.jvp(aten_copy(ffn), (inputs[0],), (tangent,))[1])
        assert scratch.held("ffn intermediate") is None
        assert type(ffn(inputs[0].as_subclass(PassThroughTensor))) is PassThroughTensor
        assert scratch.held("ffn intermediate") is None
        batch = padded_batch(lengths=(12, 12))
        model(**batch)  # the kernel choices are made
        captured = []
        original_forward = ffn.fc2.forward
        ffn.fc2.forward = lambda input: captured.append((input, input.clone())) or original_forward(input)
        model(**batch)
        del ffn.fc2.forward
    assert torch.equal(*captured[0])


@needs_onednn
def test_int8_row_scaled_layers_run_under_vmap():
    from modeling_selfattn.quantization import int8_linear

    torch.manual_seed(0)
    layer = int8_linear(torch.nn.Linear(16, 8), reduce_range=False, per_token=True)
    inputs = torch.randn(3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.func.vmap(layer)(inputs), torch.stack([layer(sample) for sample in inputs]))


def int8_encoder_and_batch(rows_per_block: int, monkeypatch):
    """An int8 SelfAttnModel (quantize's defaults: fc1 and fc2 with per-token activations) whose feed-forwards take
    `rows_per_block` rows at a time (kernels.ROW_BLOCK_BYTES set to match), and a batch of 3x16 tokens."""
    from integration_helpers import encoder_config

    torch.manual_seed(0)
    model = SelfAttnModel(encoder_config()).eval().quantize("int8")
    intermediate = model.encoder.layers[0].ffn.fc1.out_features
    monkeypatch.setattr(kernels, "ROW_BLOCK_BYTES", 4 * intermediate * rows_per_block)
    return model, {"input_ids": torch.randint(3, 99, (3, 16))}


@pytest.fixture
def per_token_rows(monkeypatch) -> list:
    """The row count of every call of an int8 per-token layer (Int8RowScaledLinear), recorded without a hook."""
    from modeling_selfattn.quantization import Int8RowScaledLinear

    rows_seen = []
    original = Int8RowScaledLinear.forward
    monkeypatch.setattr(
        Int8RowScaledLinear, "forward", lambda self, x: rows_seen.append(x.shape[:-1].numel()) or original(self, x)
    )
    return rows_seen


def test_int8_feed_forwards_run_in_row_blocks_with_the_same_bits(monkeypatch, per_token_rows, int8_kernel):
    """Rows 7 at a time: the 48 tokens of a 3x16 batch in seven blocks as even as can be (six of 7, one of 6), each
    through fc1 and fc2 alone, with the same bits as one call of every row (the per-token layers compute each row
    alone); a padded batch too, 5 rows at a time."""
    model, batch = int8_encoder_and_batch(7, monkeypatch)
    layers = len(model.encoder.layers)
    attention_mask = torch.ones_like(batch["input_ids"])
    attention_mask[1, 9:] = attention_mask[2, 13:] = 0
    padded = {**batch, "attention_mask": attention_mask}
    with torch.no_grad():
        in_blocks = model(**batch).last_hidden_state
        assert per_token_rows == [rows for rows in (7, 7, 7, 7, 7, 7, 6) for _ in ("fc1", "fc2")] * layers
        monkeypatch.setattr(kernels, "ROW_BLOCK_BYTES", 4 * model.encoder.layers[0].ffn.fc1.out_features * 5)
        per_token_rows.clear()
        padded_in_blocks = model(**padded).last_hidden_state
        assert set(per_token_rows) <= {5, 4, 3, 2, 1} and len(per_token_rows) > 2 * layers
        monkeypatch.setattr(kernels, "ROW_BLOCK_BYTES", 2**40)
        per_token_rows.clear()
        whole = model(**batch).last_hidden_state
        assert per_token_rows == [48] * 2 * layers
        whole_padded = model(**padded).last_hidden_state
    assert torch.equal(in_blocks, whole)
    assert torch.equal(padded_in_blocks, whole_padded)


def test_row_blocks_take_any_input_shape_and_run_under_vmap(monkeypatch):
    """A 4-D input, a non-contiguous one and a batch under vmap: blocks over their flattened rows, the input's shape
    back, the same bits as one call."""
    model, _ = int8_encoder_and_batch(7, monkeypatch)
    ffn = model.encoder.layers[0].ffn
    inputs = torch.randn(2, 3, 5, ffn.fc1.in_features)
    strided = torch.randn(ffn.fc1.in_features, 30).t()
    samples = torch.randn(2, 20, ffn.fc1.in_features)
    with torch.no_grad():
        in_blocks = [ffn(inputs), ffn(strided), torch.func.vmap(ffn)(samples)]
        monkeypatch.setattr(kernels, "ROW_BLOCK_BYTES", 2**40)
        whole = [ffn(inputs), ffn(strided), torch.stack([ffn(sample) for sample in samples])]
    assert in_blocks[0].shape == (2, 3, 5, ffn.fc2.out_features) and in_blocks[1].shape == (30, ffn.fc2.out_features)
    assert all(torch.equal(blocks, one_call) for blocks, one_call in zip(in_blocks, whole))


def test_row_blocks_only_for_unobserved_per_token_int8_pairs_in_evaluation(monkeypatch, per_token_rows):
    """One call for every row where a hook or a replaced forward observes the feed-forward's fc1, activation,
    dropout or fc2, where a module trains (the dropout would draw its mask by blocks), where its layers are float32
    or int8 with one scale per tensor (a row's result then depends on the others) and where the rows fit one
    block."""
    from modeling_selfattn.quantization import int8_linear

    model, batch = int8_encoder_and_batch(7, monkeypatch)
    ffn = model.encoder.layers[0].ffn
    modules = (ffn.activation, ffn.activation_dropout, ffn.fc2)
    rows = torch.randn(1, 40, ffn.fc1.in_features)
    assert kernels.rows_per_block(ffn.fc1, modules, rows) == 7
    assert kernels.rows_per_block(ffn.fc1, modules, rows[:, :7]) is None
    # with config.chunk_size_feed_forward too, the smaller blocks
    assert kernels.rows_per_block(ffn.fc1, modules, rows, chunk_size=3) == 3
    assert kernels.rows_per_block(ffn.fc1, modules, rows, chunk_size=100) == 7
    for module in (ffn.fc1, *modules):
        handle = module.register_forward_hook(lambda *args: None)
        assert kernels.rows_per_block(ffn.fc1, modules, rows) is None
        handle.remove()
        module.forward = lambda *args, forward=module.forward: forward(*args)  # a capture tool's wrapper
        assert kernels.rows_per_block(ffn.fc1, modules, rows) is None
        del module.forward
        module.forward = module.forward  # the class's own, bound: what kernels' kernelize leaves without a kernel
        assert kernels.rows_per_block(ffn.fc1, modules, rows) == 7
        del module.forward
    ffn.activation_dropout.train()
    assert kernels.rows_per_block(ffn.fc1, modules, rows) is None
    ffn.activation_dropout.eval()
    float_ffn = SelfAttnModel(model.config).eval().encoder.layers[0].ffn
    assert kernels.rows_per_block(float_ffn.fc1, (float_ffn.activation, float_ffn.fc2), rows) is None
    per_tensor = int8_linear(torch.nn.Linear(ffn.fc1.in_features, ffn.fc1.out_features), reduce_range=False)
    assert kernels.rows_per_block(per_tensor, modules, rows) is None
    assert kernels.rows_per_block(ffn.fc1, modules, rows) == 7
    with torch.no_grad():  # observed: one call of every row, the same bits as the blocks
        in_blocks = model(**batch).last_hidden_state
        handle = ffn.fc1.register_forward_hook(lambda *args: None)
        per_token_rows.clear()
        observed = model(**batch).last_hidden_state
        handle.remove()
    assert per_token_rows[:2] == [48, 48] and per_token_rows[2] == 7  # the hooked layer, then the next in blocks
    assert torch.equal(in_blocks, observed)


def test_a_traced_int8_feed_forward_takes_inputs_of_any_length(monkeypatch):
    """torch.jit.trace records one call of every row (blocks would be kept as constants): the trace, made on 40 rows,
    gives 60 rows the bits of eager blocks."""
    model, _ = int8_encoder_and_batch(7, monkeypatch)
    ffn = model.encoder.layers[0].ffn
    with torch.no_grad():
        traced = torch.jit.trace(ffn, torch.randn(1, 40, ffn.fc1.in_features), check_trace=False)
        longer = torch.randn(1, 60, ffn.fc1.in_features)
        assert torch.equal(traced(longer), ffn(longer))
