"""model.quantize("int8") and model.quantize("bf16") (modeling_selfattn/quantization.py) on tiny random models of
every head: outputs against the float32 model on the same weights, generate() after quantizing, and the refusals.

Tolerances are relative to the largest float32 value of each output tensor: int8 0.05, bf16 0.03. Measured over every
head with seeds 0-4: int8 at most 0.035 (the multiple-choice head's one logit per choice; the others at most 0.023),
bf16 at most 0.017. Real-model quality (SST-2 accuracy, embedding cosine, BLEU) is measured by
benchmarks/quantized_quality.py, not here.
"""

import copy
import gc
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from torch import nn

from integration_helpers import (
    causal_config,
    encoder_config,
    encoder_inputs,
    run_without_package,
    seq2seq_config,
    seq2seq_inputs,
)
from modeling_selfattn import (
    SelfAttnForCausalLM,
    SelfAttnForConditionalGeneration,
    SelfAttnForMaskedLM,
    SelfAttnForMultipleChoice,
    SelfAttnForPreTraining,
    SelfAttnForQuestionAnswering,
    SelfAttnForReplacedTokenDetection,
    SelfAttnForSequenceClassification,
    SelfAttnForTokenClassification,
    SelfAttnModel,
)
from modeling_selfattn import quantization
from modeling_selfattn.heads import HEADS as REGISTRY
from modeling_selfattn.quantization import (
    KEEP_FLOAT32_DEFAULT,
    PER_TOKEN_DEFAULT,
    Int8DynamicLinear,
    Int8RowScaledLinear,
    int8_activations_use_full_range,
    int8_linear,
    quantize,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
INT8_RELATIVE_TOLERANCE = 0.05
BF16_RELATIVE_TOLERANCE = 0.03


# name -> (class, config factory, inputs factory)
HEADS = {
    "model": (SelfAttnModel, encoder_config, encoder_inputs),
    "masked_lm": (SelfAttnForMaskedLM, encoder_config, encoder_inputs),
    "sequence_classification": (SelfAttnForSequenceClassification, encoder_config, encoder_inputs),
    "token_classification": (SelfAttnForTokenClassification, encoder_config, encoder_inputs),
    "question_answering": (SelfAttnForQuestionAnswering, encoder_config, encoder_inputs),
    "multiple_choice": (
        SelfAttnForMultipleChoice, encoder_config, lambda: {"input_ids": torch.randint(3, 99, (2, 3, 6))}
    ),
    "seq2seq_model": (SelfAttnModel, seq2seq_config, seq2seq_inputs),
    "seq2seq_lm": (SelfAttnForConditionalGeneration, seq2seq_config, seq2seq_inputs),
    "causal_lm": (SelfAttnForCausalLM, causal_config, encoder_inputs),
    "pretraining": (SelfAttnForPreTraining, encoder_config, encoder_inputs),
    "replaced_token_detection": (SelfAttnForReplacedTokenDetection, encoder_config, encoder_inputs),
}


def test_every_registered_head_is_covered():
    assert {head.class_name for head in REGISTRY} <= {model_class.__name__ for model_class, *_ in HEADS.values()}


def make_model(name: str, seed: int = 0) -> tuple[nn.Module, dict]:
    model_class, make_config, make_inputs = HEADS[name]
    torch.manual_seed(seed)
    return model_class(make_config()).eval(), make_inputs()


def float_outputs(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        outputs = model(**inputs)
    tensors = {key: value for key, value in outputs.items() if torch.is_tensor(value)}
    return {key: value.float() for key, value in tensors.items() if value.is_floating_point()}


def largest_relative_error(expected: dict, actual: dict) -> dict[str, float]:
    assert sorted(expected) == sorted(actual)
    return {key: ((actual[key] - value).abs().max() / value.abs().max()).item() for key, value in expected.items()}


def linear_kinds(model: nn.Module) -> dict[str, str]:
    """Each linear layer's name -> "float32", "per token" or "per tensor" (its activations' scales)."""
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            kinds[name] = "float32"
        elif isinstance(module, Int8DynamicLinear):
            kinds[name] = "per token" if isinstance(module, Int8RowScaledLinear) else "per tensor"
    return kinds


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("defaults", [True, False], ids=["defaults", "every_layer_per_tensor"])
def test_int8_outputs_are_close_to_float32(name, defaults, int8_kernel):
    """The defaults keep the encoder's value projections in float32 and scale its fc1's and fc2's activations per token
    (decoders and heads: int8, per tensor); with keep_float32=[] and per_token_activations=[] every linear layer is
    int8 with activations scaled per tensor."""
    model, inputs = make_model(name)
    expected = float_outputs(model, inputs)
    quantized = copy.deepcopy(model)
    options = {} if defaults else {"keep_float32": [], "per_token_activations": []}
    assert quantized.quantize("int8", **options) is quantized
    kinds = linear_kinds(quantized)
    for layer, kind in kinds.items():
        in_encoder = layer.startswith(("encoder.", "model.encoder."))
        if defaults and in_encoder and layer.endswith("v_proj"):
            assert kind == "float32", layer
        elif defaults and in_encoder and layer.endswith(("fc1", "fc2")):
            assert kind == "per token", layer
        else:
            assert kind == "per tensor", layer
    assert any(kind == "per tensor" for kind in kinds.values())
    assert quantized.quantization_mode == "int8"
    errors = largest_relative_error(expected, float_outputs(quantized, inputs))
    assert max(errors.values()) <= INT8_RELATIVE_TOLERANCE, errors
    # Quantization changed something: a comparison that could not fail would prove nothing.
    assert max(errors.values()) > 0


def test_defaults_are_the_documented_patterns():
    assert KEEP_FLOAT32_DEFAULT == ("layers.*.v_proj",)
    assert PER_TOKEN_DEFAULT == ("layers.*.fc1", "layers.*.fc2")


def test_defaults_apply_to_an_encoder_stack_quantized_on_its_own():
    model, inputs = make_model("model")
    encoder = model.encoder
    expected = encoder(**inputs).last_hidden_state.detach()
    encoder.quantize("int8")
    kinds = linear_kinds(encoder)
    assert {name for name, kind in kinds.items() if kind == "float32"} == {
        f"layers.{i}.self_attn.v_proj" for i in (0, 1)
    }
    assert {name for name, kind in kinds.items() if kind == "per token"} == {
        f"layers.{i}.ffn.{fc}" for i in (0, 1) for fc in ("fc1", "fc2")
    }
    actual = encoder(**inputs).last_hidden_state
    assert 0 < ((actual - expected).abs().max() / expected.abs().max()).item() <= INT8_RELATIVE_TOLERANCE


@pytest.mark.parametrize("name", sorted(HEADS))
def test_bf16_outputs_are_close_to_float32(name):
    model, inputs = make_model(name)
    expected = float_outputs(model, inputs)
    quantized = copy.deepcopy(model).quantize("bf16")
    dtypes = {tensor.dtype for tensor in [*quantized.parameters(), *quantized.buffers()] if tensor.is_floating_point()}
    assert dtypes == {torch.bfloat16}
    errors = largest_relative_error(expected, float_outputs(quantized, inputs))
    assert 0 < max(errors.values()) <= BF16_RELATIVE_TOLERANCE, errors


@pytest.mark.parametrize("bf16_attention", [False, True])
@pytest.mark.parametrize(
    "name, headless",
    [
        ("sequence_classification", {1: [0, 1, 2, 3]}),
        ("seq2seq_lm", {"encoder.1": [0, 1, 2, 3], "decoder.0": [0, 1, 2, 3], "decoder.1.cross_attn": [0, 1, 2, 3]}),
    ],
)
def test_int8_of_a_model_with_headless_layers_keeps_their_empty_projections_in_float32(name, headless, bf16_attention):
    model, inputs = make_model(name)
    model.prune_heads(headless)
    expected = float_outputs(model, inputs)
    model.quantize("int8", bf16_attention=bf16_attention)
    empty = {
        layer for layer, module in model.named_modules() if isinstance(module, nn.Linear) and not module.weight.numel()
    }
    assert len(empty) == 4 * len(headless)  # q, k, v and o of each headless attention
    float32 = {layer for layer, kind in linear_kinds(model).items() if kind == "float32"}
    assert empty <= float32 and all(layer.endswith("v_proj") for layer in float32 - empty)
    assert model.quantization_mode == "int8"
    errors = largest_relative_error(expected, float_outputs(model, inputs))
    assert 0 < max(errors.values()) <= INT8_RELATIVE_TOLERANCE, errors


def module_attributes(model: nn.Module) -> dict[str, tuple[dict, ...]]:
    """Each module's attributes, parameters, buffers and children, by name (the objects themselves)."""
    return {
        name: (dict(vars(module)), dict(module._parameters), dict(module._buffers), dict(module._modules))
        for name, module in model.named_modules(remove_duplicate=False)
    }


def test_int8_that_fails_partway_leaves_the_model_as_it_was(monkeypatch):
    model = head_with_logits_bias(SelfAttnForConditionalGeneration)
    inputs = seq2seq_inputs()
    expected = copy.deepcopy(model).quantize("int8", bf16_attention=True)
    before = module_attributes(model)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    made = []

    def fail_on_the_second_layer(*args, **kwargs):
        if made:
            raise RuntimeError("no memory left")
        made.append(int8_linear(*args, **kwargs))
        return made[0]

    monkeypatch.setattr(quantization, "int8_linear", fail_on_the_second_layer)
    with pytest.raises(RuntimeError, match="no memory left"):
        model.quantize("int8", bf16_attention=True)
    monkeypatch.undo()
    after = module_attributes(model)
    assert after.keys() == before.keys()
    for name, parts in before.items():
        for part, was in zip(after[name], parts):
            assert part.keys() == was.keys() and all(part[key] is value for key, value in was.items()), name
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
    assert all(parameter.requires_grad for parameter in model.parameters())
    # The next try is not refused as a second quantize(), and gives what a quantize() that never failed gives.
    model.quantize("int8", bf16_attention=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected(**inputs).logits, rtol=0, atol=0)


def test_int8_tied_lm_head_gets_its_own_copy_and_the_token_table_stays_float32():
    model, _ = make_model("seq2seq_lm")
    table = model.get_input_embeddings().weight
    assert model.lm_head.weight is table
    saved_table = table.detach().clone()
    model.quantize("int8")
    assert isinstance(model.lm_head, Int8DynamicLinear)
    assert model.get_input_embeddings().weight is table and table.dtype == torch.float32
    assert torch.equal(table, saved_table)
    # The int8 copy is the table, per output channel: dequantized, each row within half a step of the original.
    int8_weight = model.lm_head.weight()
    steps = int8_weight.q_per_channel_scales().float().unsqueeze(1)
    assert int8_weight.qscheme() in (torch.per_channel_symmetric, torch.per_channel_affine)
    assert ((int8_weight.dequantize() - table).abs() <= steps / 2 + 1e-7).all()


def head_with_logits_bias(model_class, seed: int = 0) -> nn.Module:
    config = seq2seq_config() if model_class is SelfAttnForConditionalGeneration else causal_config()
    config.add_final_logits_bias = True
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_()
    return model


@pytest.mark.parametrize("activations", ["per_tensor", "per_token"])
@pytest.mark.parametrize("model_class", [SelfAttnForConditionalGeneration, SelfAttnForCausalLM])
def test_int8_lm_head_adds_the_final_logits_bias_itself(model_class, activations, int8_kernel):
    model = head_with_logits_bias(model_class)
    bias = model.final_logits_bias.clone()
    unfolded = copy.deepcopy(model).quantize("int8", keep_float32=["lm_head"])
    per_token = ["lm_head"] if activations == "per_token" else None
    model.quantize("int8", per_token_activations=per_token)
    assert model.final_logits_bias is None
    assert isinstance(model.lm_head, Int8RowScaledLinear) == (activations == "per_token")
    assert torch.equal(model.lm_head.bias(), bias[0])
    # The same logits as the int8 LM head without the bias, then the bias: to float32 rounding.
    with torch.no_grad():
        hidden = torch.randn(2, 3, model.config.hidden_size)
        bare = int8_linear(unfolded.lm_head, model.lm_head.reduce_range, per_token=activations == "per_token")
        torch.testing.assert_close(model.lm_head(hidden), bare(hidden) + bias, rtol=0, atol=1e-5)
        inputs = seq2seq_inputs() if model_class is SelfAttnForConditionalGeneration else encoder_inputs()
        head_outputs = []
        model.lm_head.register_forward_hook(lambda module, args, output: head_outputs.append(output))
        logits = model(**inputs).logits
    assert torch.equal(logits, head_outputs[0])  # the head adds nothing after its LM head
    # kept in float32, the LM head leaves the bias to the head
    assert torch.equal(unfolded.final_logits_bias, bias) and isinstance(unfolded.lm_head, nn.Linear)


def test_int8_linear_refuses_a_second_bias():
    with pytest.raises(ValueError, match=r"int8_linear\(bias=...\).*has a bias of its own"):
        int8_linear(nn.Linear(8, 4), reduce_range=False, bias=torch.zeros(4))


def test_an_lm_head_that_serves_two_heads_keeps_each_heads_bias_apart():
    first, second = head_with_logits_bias(SelfAttnForCausalLM), head_with_logits_bias(SelfAttnForCausalLM, seed=1)
    second.lm_head = first.lm_head  # one LM head, two biases
    both = nn.ModuleDict({"first": first, "second": second}).eval()
    quantize(both, "int8")
    assert first.final_logits_bias is not None and second.final_logits_bias is not None
    assert first.lm_head is second.lm_head and first.lm_head.bias() is None
    inputs = encoder_inputs()
    with torch.no_grad():
        for head in (first, second):
            hidden = head.model(**inputs).last_hidden_state
            expected = head.lm_head(hidden) + head.final_logits_bias
            torch.testing.assert_close(head(**inputs).logits, expected, rtol=0, atol=1e-5)


def test_int8_layer_computes_exactly_what_its_int8_values_mean(int8_kernel):
    # The activation range (fbgemm: 8 bits with VNNI, 7 without; oneDNN: 8) is one the kernel sums without
    # saturating: the layer equals float arithmetic on its own dequantized weight and activation, to float32 rounding.
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = int8_linear(linear, reduce_range=not int8_activations_use_full_range())
    assert layer.reduce_range == (not int8_activations_use_full_range())
    x = torch.randn(32, 64) * 4
    levels = 127 if layer.reduce_range and int8_kernel == "fbgemm" else 255
    low, high = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = (high - low) / levels
    zero_point = torch.round(-low / scale)
    x_int8 = (torch.clamp(torch.round(x / scale) + zero_point, 0, levels) - zero_point) * scale
    with torch.no_grad():
        expected = x_int8 @ layer.weight().dequantize().T + linear.bias
        actual = layer(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_int8_layers_call_the_operator_function_on_plain_arguments_and_the_packet_otherwise(monkeypatch):
    """Plain tensors with real packed weights (a ScriptObject) go straight to the operator's function, with the
    packet's results to the bit, for both layers; anything else in place of the packed weights (such as the fake
    script objects of tracing) through the packet, which handles them."""
    import contextlib

    from modeling_selfattn import quantization

    torch.manual_seed(0)
    x = torch.randn(5, 64)
    direct_calls = []

    @contextlib.contextmanager
    def recording_no_subclass_torch_function():
        direct_calls.append(1)
        with torch._C.DisableTorchFunctionSubclass():
            yield

    monkeypatch.setattr(quantization, "NO_SUBCLASS_TORCH_FUNCTION", recording_no_subclass_torch_function)
    monkeypatch.setattr(Int8DynamicLinear, "onednn_min_rows", None)  # fbgemm's packed weights are what this is about
    monkeypatch.setattr(Int8RowScaledLinear, "onednn_min_rows", None)
    for per_token in (False, True):
        layer = int8_linear(nn.Linear(64, 48), reduce_range=False, per_token=per_token)
        direct_calls.clear()
        with torch.no_grad():
            direct = layer(x)
        assert direct_calls == [1]
        operator = quantization.LINEAR_ROW_SCALED if per_token else quantization.LINEAR_DYNAMIC
        packet_calls = []

        class StandIn:  # what a fake script object is to this layer: not a ScriptObject
            pass

        packed = layer._packed_params._packed_params
        monkeypatch.setattr(layer._packed_params, "_packed_params", StandIn())
        # The packet's call, given the real packed weights in place of the stand-in.
        monkeypatch.setattr(
            quantization, "LINEAR_ROW_SCALED" if per_token else "LINEAR_DYNAMIC",
            lambda *a: packet_calls.append(type(a[-1] if per_token else a[1])) or operator(
                *[packed if isinstance(argument, StandIn) else argument for argument in a]
            ),
        )
        direct_calls.clear()
        with torch.no_grad():
            assert torch.equal(layer(x), direct)
        assert packet_calls == [StandIn] and direct_calls == []


class RecordingTensor(torch.Tensor):
    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_call_on_packed_weights_honours_subclasses_modes_and_stand_ins():
    from torch.overrides import TorchFunctionMode

    from modeling_selfattn import quantization

    torch.manual_seed(0)
    layer = int8_linear(nn.Linear(64, 48), reduce_range=False)
    packed = layer._packed_params._packed_params
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = quantization.LINEAR_DYNAMIC(x, packed, False)
        assert torch.equal(quantization.call_on_packed_weights(quantization.LINEAR_DYNAMIC, x, packed, False), expected)
        # A subclass's __torch_function__ is called, as by the packet's own call.
        RecordingTensor.seen.clear()
        output = quantization.call_on_packed_weights(quantization.LINEAR_DYNAMIC, x.as_subclass(RecordingTensor),
                                                     packed, False)
        assert RecordingTensor.seen and torch.equal(output.as_subclass(torch.Tensor), expected)

        # A torch function mode sees the direct call too.
        class Recording(TorchFunctionMode):
            seen = []

            def __torch_function__(self, func, types, args=(), kwargs=None):
                Recording.seen.append(func)
                return func(*args, **(kwargs or {}))

        with Recording():
            output = quantization.call_on_packed_weights(quantization.LINEAR_DYNAMIC, x, packed, False)
        assert Recording.seen == [quantization.LINEAR_DYNAMIC] and torch.equal(output, expected)
        # After the call, subclasses' __torch_function__ is on again.
        RecordingTensor.seen.clear()
        torch.add(x.as_subclass(RecordingTensor), 1)
        assert RecordingTensor.seen

        class StandIn:  # what a fake script object is to call_on_packed_weights: not a ScriptObject
            pass

        stand_in, seen = StandIn(), []
        quantization.call_on_packed_weights(lambda *a: seen.append(a), x, stand_in, False)
        assert seen == [(x, stand_in, False)]


def row_scaled_layer(reduce_range: bool = False, bias: bool = True) -> tuple[nn.Linear, Int8RowScaledLinear]:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=bias)
    return linear, int8_linear(linear, reduce_range=reduce_range, per_token=True)


@pytest.mark.parametrize("reduce_range", [False, True], ids=["8_bits", "7_bits"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_row_scaled_layer_computes_exactly_what_its_int8_values_mean(reduce_range, bias, int8_kernel):
    """Each row quantized on its own grid from min(row, 0) to max(row, 0) (255 steps, or 127 where the kernel needs
    7 bits), times the dequantized int8 weight, plus the float32 bias: equal to float arithmetic on those values."""
    linear, layer = row_scaled_layer(reduce_range, bias)
    x = torch.randn(32, 64) * 4
    x[3] *= 50  # a row far larger than the rest: per tensor, the others would get few levels
    x[5] = x[5].abs() + 1  # a row with no negative value: its grid starts at 0
    levels = 127 if reduce_range else 255
    low, high = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    step = (high - low) / levels
    x_int8 = torch.round((x - low) / step) * step + low
    with torch.no_grad():
        expected = x_int8 @ layer.weight().dequantize().T + (linear.bias if bias else 0)
        actual = layer(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    # Per row, not per tensor: the per-tensor layer of the same weights is further from float32 on the small rows.
    float_output = linear(x).detach()
    per_tensor = int8_linear(linear, reduce_range=reduce_range)(x).detach()
    small_rows = [row for row in range(32) if row != 3]
    error = (actual - float_output)[small_rows].abs().max()
    assert error < 0.5 * (per_tensor - float_output)[small_rows].abs().max()


def test_row_scaled_layer_gives_a_row_the_same_result_in_any_batch(int8_kernel):
    """A row's result does not depend on the other rows of its batch, nor on the batch's shape: alone, with others, in
    a 3-D batch. Bit for bit on the Xeon this was written on; the kernel's row blocking may differ on other CPUs, so
    the test allows float32 rounding: 1e-6 of the output's scale, far below one quantization step (with one scale per
    tensor a row moves by 4.5e-3 of it here)."""
    linear, layer = row_scaled_layer()
    x = torch.randn(2, 5, 64)
    x[1, 2] *= 100
    with torch.no_grad():
        whole = layer(x)
        tolerance = 1e-6 * whole.abs().max().item()
        for batch, position in [(0, 0), (0, 3), (1, 4)]:
            with_others = layer(torch.stack([x[batch, position], torch.randn(64) * 30]))[0]
            alone = layer(x[batch, position].view(1, 1, 64))
            assert alone.shape == (1, 1, 48)
            for result in (with_others, alone[0, 0]):
                torch.testing.assert_close(result, whole[batch, position], rtol=0, atol=tolerance)
        flat = x.view(10, 64)
        for count in (1, 2, 7):
            torch.testing.assert_close(layer(flat[:count]), layer(flat)[:count], rtol=0, atol=tolerance)
        assert layer(torch.zeros(0, 64)).shape == (0, 48)
        assert torch.equal(layer(torch.zeros(3, 64)), linear.bias.expand(3, 48))  # an all-zero row: the bias alone


def test_row_scaled_layer_normalizes_in_scratch_without_changing_its_input_or_result(monkeypatch, int8_kernel):
    """The rows mapped onto [0, 255] go into this thread's scratch buffer (scratch.py): the layer leaves its input as it
    was, and gives the same bits whether the buffer is fresh, reused after another layer's larger call, or bypassed
    (a request beyond scratch.MAX_BYTES)."""
    from modeling_selfattn import scratch

    _, layer = row_scaled_layer()
    x = torch.randn(6, 64) * 3
    original = x.clone()
    scratch.release()
    with torch.no_grad():
        fresh = layer(x)
        assert scratch.held("int8 rows").numel() == x.numel()
        _, wider = row_scaled_layer()
        wider(torch.randn(40, 64))  # the buffer grows and holds other rows now
        reused = layer(x)
        monkeypatch.setattr(scratch, "MAX_BYTES", 10 * 4)  # 10 floats
        bypassed = layer(x)
    assert scratch.held("int8 rows").numel() == 40 * 64
    assert torch.equal(x, original)
    # Exact: the same elementwise passes and int32-summed products on the same values, only in other memory.
    assert torch.equal(reused, fresh) and torch.equal(bypassed, fresh)
    scratch.release()


@pytest.fixture
def onednn_calls(monkeypatch, onednn_int8_exact) -> list:
    """The row count of every oneDNN int8 product, recorded around quantization.ONEDNN_QLINEAR."""
    from modeling_selfattn import quantization

    calls, original = [], quantization.ONEDNN_QLINEAR
    monkeypatch.setattr(quantization, "ONEDNN_QLINEAR", lambda x, *a: calls.append(x.shape[0]) or original(x, *a))
    return calls


def test_per_tensor_layer_takes_onednn_from_its_row_threshold(monkeypatch, onednn_calls):
    """Below onednn_min_rows rows fbgemm, from it oneDNN, counting the rows of a 3-D input; None: fbgemm always.
    Either way the result is the layer's int8 arithmetic (test_int8_layer_computes_exactly_what_its_int8_values_mean),
    so the two agree within a step of the activations' grid."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = int8_linear(linear, reduce_range=False)
    monkeypatch.setattr(layer, "onednn_min_rows", 8)
    x = torch.randn(2, 4, 64)
    with torch.no_grad():
        below = layer(x[:, :3])
        assert onednn_calls == []
        at = layer(x)
        assert onednn_calls == [8]
        layer.onednn_min_rows = None
        assert layer(x).shape == at.shape == (2, 4, 48) and onednn_calls == [8]
        torch.testing.assert_close(below, layer(x[:, :3]), rtol=0, atol=0)
        step = (x.max() - x.min()) / 255 * linear.weight.abs().sum(1).max()
        torch.testing.assert_close(at, layer(x), rtol=0, atol=step.item())


def test_a_large_per_tensor_weight_takes_onednn_from_fewer_rows(monkeypatch, onednn_calls):
    """A weight of at least ONEDNN_INT8_LARGE_WEIGHT values (an LM head) takes oneDNN from
    ONEDNN_INT8_LARGE_WEIGHT_MIN_ROWS rows where the layer's own threshold is higher, and never where it is None
    (fbgemm forced); a smaller weight keeps the layer's threshold. Sizes scaled down: the threshold set to this
    layer's 64x48 weight."""
    from modeling_selfattn import quantization

    monkeypatch.setattr(quantization, "ONEDNN_INT8_LARGE_WEIGHT", 64 * 48)
    monkeypatch.setattr(quantization, "ONEDNN_INT8_LARGE_WEIGHT_MIN_ROWS", 4)
    large = int8_linear(nn.Linear(64, 48), reduce_range=False)
    small = int8_linear(nn.Linear(64, 47), reduce_range=False)
    for layer in (large, small):
        layer.onednn_min_rows = 1024
    x = torch.randn(2, 2, 64)
    with torch.no_grad():
        large(x[:, :1])
        small(x)
        assert onednn_calls == []
        large(x)
        assert onednn_calls == [4]
        large.onednn_min_rows = None
        large(x)
        assert onednn_calls == [4]


def test_row_scaled_layer_takes_one_kernel_for_every_call(onednn_calls):
    """The per-token layers' default is oneDNN on every call (AMX) or on none: a row's result must not depend on how
    many rows come with it, and the two kernels round otherwise."""
    from modeling_selfattn import quantization

    assert Int8RowScaledLinear.onednn_min_rows == (1 if quantization.ONEDNN_INT8 else None)
    assert Int8DynamicLinear.onednn_min_rows == (
        quantization.ONEDNN_INT8_MIN_ROWS if quantization.ONEDNN_INT8 else None
    )
    _, layer = row_scaled_layer()
    layer.onednn_min_rows = 1
    with torch.no_grad():
        layer(torch.randn(1, 64))
        layer(torch.randn(300, 64))
    assert onednn_calls == [1, 300]


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # torch.load of a pickled layer
@pytest.mark.parametrize("per_token", [False, True], ids=["per_tensor", "per_token"])
def test_onednn_weight_follows_new_weights_and_copies_pack_their_own(per_token, onednn_calls, tmp_path):
    """oneDNN's packed weight is made at the first oneDNN call and made again for weights loaded since
    (load_state_dict); deepcopy and pickling, which cannot copy it, give copies that pack their own."""
    from modeling_selfattn import quantization

    torch.manual_seed(0)
    layer, other = (int8_linear(nn.Linear(64, 48), reduce_range=False, per_token=per_token) for _ in range(2))
    for module in (layer, other):
        module.onednn_min_rows = 1
    x = torch.randn(6, 64)
    with torch.no_grad():
        before, expected = layer(x), other(x)
        assert layer.onednn_weight.source is layer._packed_params._packed_params
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), expected) and not torch.equal(before, expected)
        torch.save(layer, tmp_path / "layer.pt")
        copies = [copy.deepcopy(layer), torch.load(tmp_path / "layer.pt", weights_only=False)]
        for copied in copies:
            assert isinstance(copied.onednn_weight, quantization.OneDNNWeight)
            assert copied.onednn_weight.source is None
            assert torch.equal(copied(x), expected)
    assert onednn_calls == [6] * 5


def test_row_scaled_layer_gives_the_same_bits_on_both_kernels(monkeypatch, onednn_calls):
    """Per token, both kernels round each row's steps alike and scale the int32 sums by the weight's channel scale
    alone, so their results are the same bits (on the CPUs measured); rows of every kind, 8 and 7 bits."""
    torch.manual_seed(0)
    x = torch.randn(40, 64) * 3
    x[1] = x[1].abs()  # no negative value
    x[2] = -x[2].abs()  # no positive value
    x[3] = 0
    x[4] *= 1e-30
    x[5] = torch.nn.functional.gelu(x[5] * 5)
    for reduce_range in (False, True):
        _, layer = row_scaled_layer(reduce_range)
        with torch.no_grad():
            layer.onednn_min_rows = None
            fbgemm = layer(x)
            layer.onednn_min_rows = 1
            onednn = layer(x)
        assert torch.equal(onednn, fbgemm), (onednn - fbgemm).abs().max()
    assert onednn_calls == [40, 40]


@pytest.mark.parametrize("scale", [0.0, 1e-37, 1e-20])
def test_row_scaled_layer_keeps_rows_of_tiny_range(scale, int8_kernel):
    """A row's steps stay finite however narrow its range: an all-zero row gives exactly the bias (zeros without
    one), and a row of tiny values the same relative error as any."""
    linear, layer = row_scaled_layer(bias=False)
    x = torch.randn(3, 64) * scale
    with torch.no_grad():
        output, expected = layer(x), linear(x)
    if scale == 0:
        assert torch.equal(output, torch.zeros(3, 48))
    else:
        assert torch.isfinite(output).all()
        error = (output.double() - expected.double()).norm() / expected.double().norm()  # float32 norms underflow
        assert error.item() < 0.02


def test_per_tensor_onednn_takes_what_it_cannot_quantize_to_fbgemm(onednn_calls):
    """A NaN or an infinity in the input has no grid: the call goes to fbgemm, as any other call would, rather than
    failing; under torch.func.vmap, where the range cannot be read as numbers, fbgemm too, with each sample's
    result."""
    torch.manual_seed(0)
    layer = int8_linear(nn.Linear(64, 48), reduce_range=False)
    layer.onednn_min_rows = 1
    with torch.no_grad():
        for bad in (float("nan"), float("-inf")):
            x = torch.randn(3, 64)
            x[1, 5] = bad
            assert layer(x).shape == (3, 48)
        assert onednn_calls == []
        samples = torch.randn(4, 5, 64)
        batched = torch.func.vmap(layer)(samples)
        assert onednn_calls == []
        layer.onednn_min_rows = None
        torch.testing.assert_close(batched, torch.stack([layer(sample) for sample in samples]))


def test_dispatch_modes_and_other_dtypes_take_fbgemm(onednn_calls):
    """Under a dispatch mode (make_fx, fake tensors), where the activations' range cannot be read as numbers and the
    opaque packed weight must not enter a graph, both layers take fbgemm; so does a per-tensor input that is not
    float32, refused by fbgemm as at any row count."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layers = [int8_linear(nn.Linear(64, 48), reduce_range=False, per_token=per_token) for per_token in (False, True)]
    x = torch.randn(6, 64)
    with torch.no_grad():
        for layer in layers:
            layer.onednn_min_rows = 1
            with PassThrough():
                layer(x)
        assert onednn_calls == []
        for rows in (None, 1):
            layers[0].onednn_min_rows = rows
            with pytest.raises(RuntimeError, match="expected scalar type Float"):
                layers[0](x.double())
    assert onednn_calls == []


def test_a_layer_forced_onto_onednn_on_a_cpu_without_vnni_refuses(monkeypatch):
    from modeling_selfattn import quantization

    monkeypatch.setattr(quantization, "ONEDNN_INT8_EXACT", False)
    _, layer = row_scaled_layer()
    layer.onednn_min_rows = 1
    with torch.no_grad(), pytest.raises(RuntimeError, match="onednn_min_rows = None"):
        layer(torch.randn(2, 64))
    layer.onednn_min_rows = None
    with torch.no_grad():
        assert layer(torch.randn(2, 64)).shape == (2, 48)


@pytest.mark.parametrize(
    "capabilities, environment, fast",
    [
        ({"amx_int8": True}, {}, True),
        ({"amx_int8": True}, {"ONEDNN_MAX_CPU_ISA": "avx512_core_amx"}, True),
        ({"amx_int8": True}, {"ONEDNN_MAX_CPU_ISA": "ALL"}, True),
        ({"amx_int8": True}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, False),
        ({"amx_int8": True}, {"DNNL_MAX_CPU_ISA": "AVX2"}, False),
        ({"amx_int8": False, "avx512_vnni": True}, {}, False),
        ({}, {}, False),
    ],
)
def test_onednn_int8_is_taken_only_where_it_runs_on_amx(capabilities, environment, fast):
    from modeling_selfattn.quantization import onednn_int8_is_fast

    assert onednn_int8_is_fast(capabilities, environment) is fast


@pytest.mark.parametrize(
    "capabilities, environment, exact",
    [
        ({"amx_int8": True}, {}, True),
        ({"avx512_vnni": True}, {}, True),
        ({"avx512_vnni": True}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, True),
        ({"avx512_vnni": True}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
        ({"amx_int8": True}, {"DNNL_MAX_CPU_ISA": "avx2_vnni"}, False),
        ({"avx2": True}, {}, False),
    ],
)
def test_onednn_int8_may_be_forced_only_where_it_sums_in_int32(capabilities, environment, exact):
    from modeling_selfattn.quantization import onednn_int8_is_exact

    assert onednn_int8_is_exact(capabilities, environment) is exact


def test_int8_state_dict_carries_the_row_scaled_layers(int8_kernel):
    """load_state_dict of one int8 model's state into another, quantized from other weights, gives the first's
    outputs: the per-token layers' bias and weight sums travel with their packed weights."""
    source, inputs = make_model("sequence_classification", seed=0)
    target, _ = make_model("sequence_classification", seed=1)
    source.quantize("int8")
    target.quantize("int8")
    assert any(kind == "per token" for kind in linear_kinds(source).values())
    expected = float_outputs(source, inputs)
    assert (float_outputs(target, inputs)["logits"] - expected["logits"]).abs().max() > 1e-3
    target.load_state_dict(source.state_dict())
    for key, value in float_outputs(target, inputs).items():
        assert torch.equal(value, expected[key]), key
    layer = source.model.encoder.layers[0].ffn.fc1
    assert isinstance(layer, Int8RowScaledLinear) and torch.equal(layer.bias(), layer.row_offsets[1])


def test_defaults_follow_a_module_reachable_by_two_names():
    """A module shared under two names gets one decision: kept or per token if any of its names is."""
    model, inputs = make_model("seq2seq_lm")

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.an_alias = model.model.encoder  # comes first in named_modules(): the stack search sees only it
            self.model = model

    wrapper = Wrapper().eval()
    quantize(wrapper, "int8")
    for prefix in ("an_alias", "model.model.encoder"):
        layer = wrapper.get_submodule(prefix).layers[0]
        assert isinstance(layer.self_attn.v_proj, nn.Linear)
        assert isinstance(layer.ffn.fc1, Int8RowScaledLinear)


def test_per_token_activations_names_the_row_scaled_layers():
    model, inputs = make_model("seq2seq_lm")
    expected = float_outputs(model, inputs)
    model.quantize("int8", keep_float32=["lm_head"], per_token_activations=["*encoder*q_proj", "*decoder*fc1"])
    kinds = linear_kinds(model)
    row_scaled = {name for name, kind in kinds.items() if kind == "per token"}
    assert row_scaled == {
        *(f"model.encoder.layers.{i}.self_attn.q_proj" for i in (0, 1)),
        *(f"model.decoder.layers.{i}.ffn.fc1" for i in (0, 1)),
    }
    # An explicit keep_float32 replaces the default: the value projections are int8 now.
    assert kinds["model.encoder.layers.0.self_attn.v_proj"] == "per tensor"
    assert kinds["lm_head"] == "float32"
    errors = largest_relative_error(expected, float_outputs(model, inputs))
    assert 0 < max(errors.values()) <= INT8_RELATIVE_TOLERANCE, errors


@pytest.mark.parametrize(
    "patterns, error, message",
    [
        ("*fc2", TypeError, "per_token_activations='\\*fc2'.*pass a list of module-name patterns"),
        (["*fc3"], ValueError, r"per_token_activations=\.\.\.\): the pattern '\*fc3' matches no linear layer"),
        # A layer kept in float32 has no activations to scale: the conflict with keep_float32 is named.
        (["lm_head"], ValueError, r"the pattern 'lm_head' matches only linear layers left in float32 \(lm_head\) by "
                                  r"keep_float32 .* Drop 'lm_head' from per_token_activations, or from keep_float32"),
    ],
)
def test_bad_per_token_activations_is_refused(patterns, error, message):
    model, _ = make_model("seq2seq_lm")
    with pytest.raises(error, match=message):
        model.quantize("int8", keep_float32=["lm_head"], per_token_activations=patterns)
    assert not [module for module in model.modules() if isinstance(module, Int8DynamicLinear)]


def test_per_token_activations_with_bf16_is_refused():
    model, _ = make_model("model")
    with pytest.raises(ValueError, match="per_token_activations applies to int8 only"):
        model.quantize("bf16", per_token_activations=["*fc2"])


@pytest.mark.parametrize("mode", ["int8", "bf16"])
@pytest.mark.parametrize("name", ["seq2seq_lm", "causal_lm"])
def test_generate_after_quantize(name, mode):
    """Greedy generate() runs after quantize, and each step's logits are the float32 model's for the same prefix
    (teacher-forced, no cache) within the tolerance: the cache works with the quantized layers. Beam search runs
    too."""
    model, inputs = make_model(name)
    reference = copy.deepcopy(model)
    model.quantize(mode)
    if name == "seq2seq_lm":
        prompt = {key: value for key, value in inputs.items() if key != "decoder_input_ids"}
    else:
        prompt = {"input_ids": inputs["input_ids"]}  # unpadded: a decoder-only model pads on the left
    new_tokens = 5
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        generated = model.generate(
            **prompt, **options, output_scores=True, output_logits=True, return_dict_in_generate=True
        )
        beams = model.generate(**prompt, **options, num_beams=3)
    sequences = generated.sequences
    assert beams.shape == sequences.shape
    assert torch.equal(sequences[:, -new_tokens:], torch.stack(generated.scores, dim=1).argmax(-1))
    with torch.no_grad():
        if name == "seq2seq_lm":
            logits = reference(**prompt, decoder_input_ids=sequences[:, :-1]).logits
        else:
            logits = reference(input_ids=sequences[:, :-1]).logits
    expected = logits[:, -new_tokens:]
    actual = torch.stack(generated.logits, dim=1).float()
    tolerance = INT8_RELATIVE_TOLERANCE if mode == "int8" else BF16_RELATIVE_TOLERANCE
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert 0 < error <= tolerance, error


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if hasattr(module, "attention_dtype")]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["model", "seq2seq_lm", "causal_lm"])
def test_int8_attention_in_bf16_is_close_to_float32_and_gives_float32_outputs(name, attn_implementation):
    """bf16_attention=True: queries, keys and values in bfloat16 (the cache too), the attention's output back in
    float32 before o_proj; every output, attention maps included, in float32 and within int8's tolerance of the
    float32 model. bf16_attention=False leaves attention in float32: a different result, so the switch is real."""
    model, inputs = make_model(name)
    model.config._attn_implementation = attn_implementation
    options = {"output_attentions": True} if attn_implementation == "eager" else {}
    with torch.no_grad():
        expected = model(**inputs, **options)
    in_bf16 = copy.deepcopy(model).quantize("int8", bf16_attention=True)
    in_float32 = copy.deepcopy(model).quantize("int8", bf16_attention=False)
    assert {module.attention_dtype for module in attention_modules(in_bf16)} == {torch.bfloat16}
    assert {module.attention_dtype for module in attention_modules(in_float32)} == {None}
    with torch.no_grad():
        actual, plain = in_bf16(**inputs, **options), in_float32(**inputs, **options)
    first = "last_hidden_state" if "last_hidden_state" in expected else "logits"
    assert not torch.equal(actual[first], plain[first])
    for key, value in expected.items():
        if key == "cache":
            caches = [getattr(actual[key], name, None) for name in ("self_attention_cache", "cross_attention_cache")]
            caches = [cache for cache in caches if cache is not None] or [actual[key]]
            layers = [layer for cache in caches for layer in cache.layers]
            assert {tensor.dtype for layer in layers for tensor in (layer.keys, layer.values)} == {torch.bfloat16}
            continue
        tensors = value if isinstance(value, tuple) else (value,)
        actual_tensors = actual[key] if isinstance(actual[key], tuple) else (actual[key],)
        for reference, tensor in zip(tensors, actual_tensors, strict=True):
            assert tensor.dtype == torch.float32, key
            error = ((tensor - reference).abs().max() / reference.abs().max()).item()
            assert error <= INT8_RELATIVE_TOLERANCE, (key, error)
    if attn_implementation == "eager":
        assert actual.get("attentions") or actual.get("decoder_attentions")


@pytest.mark.parametrize("bf16_attention", [True, False])
def test_a_float32_cache_given_to_int8_attention_in_bf16_is_refused_by_name(bf16_attention):
    """A cache filled by the float32 model, then given to it quantized with bfloat16 attention: a ValueError that names
    the cache and both ways out, not torch's dtype error from inside the attention; with float32 attention the same
    cache serves, within int8's tolerance of the float32 model's next step."""
    model, inputs = make_model("causal_lm")
    next_token = inputs["input_ids"][:, :1]
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
        expected = model(input_ids=next_token, cache=copy.deepcopy(cache)).logits
        model.quantize("int8", bf16_attention=bf16_attention)
        if bf16_attention:
            expected_error = r"cache: it holds torch.float32 .*Start a new cache.*bf16_attention=False"
            with pytest.raises(ValueError, match=expected_error):
                model(input_ids=next_token, cache=cache)
            return
        actual = model(input_ids=next_token, cache=cache).logits
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert 0 < error <= INT8_RELATIVE_TOLERANCE, error


def test_int8_attention_in_bf16_on_unpadded_sequences(count_packings):
    """A batch padded enough to be packed (modeling_selfattn/packing.py) gathers the bfloat16 queries, keys and values
    into its buckets: the real tokens' outputs stay within int8's tolerance of the float32 model's."""
    model, _ = make_model("model")
    input_ids = torch.randint(3, 99, (3, 12))
    attention_mask = (torch.arange(12) < torch.tensor([12, 4, 2]).unsqueeze(1)).long()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        model.quantize("int8", bf16_attention=True)
        actual = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    assert len(count_packings) == 2  # the float32 and the int8 forward, each packed
    assert actual.dtype == torch.float32
    real = attention_mask.bool()
    error = ((actual[real] - expected[real]).abs().max() / expected[real].abs().max()).item()
    assert 0 < error <= INT8_RELATIVE_TOLERANCE, error


@pytest.mark.parametrize("native", [True, False])
def test_int8_attention_takes_bf16_by_default_where_the_cpu_computes_it(monkeypatch, native):
    monkeypatch.setattr(quantization, "computes_bf16_natively", lambda: native)
    model, _ = make_model("seq2seq_lm")
    model.quantize("int8")
    expected = torch.bfloat16 if native else None
    assert {module.attention_dtype for module in attention_modules(model)} == {expected}


AMX_XEON = {"avx512_bf16": True, "amx_bf16": True}


@pytest.mark.parametrize(
    "capabilities, environment, native",
    [
        (AMX_XEON, {}, True),
        ({"avx512_bf16": True, "amx_bf16": False}, {}, True),  # AMD Zen 4 and 5
        ({"avx512_bf16": False, "amx_bf16": False, "avx512_vnni": True}, {}, False),  # an older Xeon
        ({}, {}, False),
        (AMX_XEON, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True),
        (AMX_XEON, {"ONEDNN_MAX_CPU_ISA": "avx512_core_amx"}, True),
        (AMX_XEON, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, False),  # oneDNN held below its bf16 kernels
        (AMX_XEON, {"DNNL_MAX_CPU_ISA": "AVX2"}, False),
    ],
)
def test_computes_bf16_natively_reads_the_cpus_bf16_instructions(capabilities, environment, native):
    assert quantization.computes_bf16_natively(capabilities, environment) is native


@pytest.mark.parametrize(
    "mode, bf16_attention, error, message",
    [
        ("int8", "yes", TypeError, "pass True, False, or None"),
        ("bf16", True, ValueError, "bf16_attention applies to int8 only"),
        ("bf16", False, ValueError, "bf16_attention applies to int8 only"),
    ],
)
def test_bad_bf16_attention_is_refused(mode, bf16_attention, error, message):
    model, _ = make_model("model")
    with pytest.raises(error, match=message):
        model.quantize(mode, bf16_attention=bf16_attention)


def test_keep_float32_leaves_the_named_linears_in_float32():
    model, inputs = make_model("seq2seq_lm")
    expected = float_outputs(model, inputs)
    model.quantize("int8", keep_float32=["lm_head", "*.ffn.fc2"])
    kept = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    fc2s = {f"model.{stack}.layers.{i}.ffn.fc2" for stack in ("encoder", "decoder") for i in (0, 1)}
    assert kept == {"lm_head"} | fc2s
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    assert isinstance(model.model.encoder.layers[0].ffn.fc1, Int8DynamicLinear)
    errors = largest_relative_error(expected, float_outputs(model, inputs))
    assert 0 < max(errors.values()) <= INT8_RELATIVE_TOLERANCE, errors


def test_subclasses_of_linear_are_quantized():
    class SubclassLinear(nn.Linear):
        pass

    model, inputs = make_model("sequence_classification")
    expected = float_outputs(model, inputs)
    model.classifier.__class__ = SubclassLinear
    assert type(model.classifier) is not nn.Linear
    model.quantize("int8", keep_float32=[])
    assert not [module for module in model.modules() if isinstance(module, nn.Linear)]
    errors = largest_relative_error(expected, float_outputs(model, inputs))
    assert max(errors.values()) <= INT8_RELATIVE_TOLERANCE, errors


def test_unknown_mode_is_refused():
    model, _ = make_model("model")
    for mode in ("int4", "INT8", "fp16", None):
        with pytest.raises(ValueError, match=r"quantize\(mode=.*mode must be one of 'int8', 'bf16'"):
            model.quantize(mode)
    assert model.quantization_mode is None


@pytest.mark.parametrize(
    "keep_float32, error, message",
    [
        ("lm_head", TypeError, "pass a list of module-name patterns"),
        ([3], TypeError, "pass a list of module-name patterns"),
        (["*.ffn.fc3"], ValueError, r"the pattern '\*.ffn.fc3' matches no linear layer"),
        # Every layer kept: the model was accepted as int8 with no int8 layer (refusing training, losing bf16
        # attention on reload).
        (["*"], ValueError, r"keep_float32=\['\*'\]\): the patterns keep every linear layer .* no layer is left"),
        (["*proj", "*fc?", "lm_head"], ValueError, r"keep every linear layer of SelfAttnForConditionalGeneration"),
    ],
)
def test_bad_keep_float32_is_refused(keep_float32, error, message):
    model, _ = make_model("seq2seq_lm")
    with pytest.raises(error, match=message):
        model.quantize("int8", keep_float32=keep_float32)
    assert not [module for module in model.modules() if isinstance(module, Int8DynamicLinear)]
    assert model.quantization_mode is None and model.train().training  # as it was: a float32 model


def test_keep_float32_with_bf16_is_refused():
    model, _ = make_model("model")
    with pytest.raises(ValueError, match="keep_float32 applies to int8 only"):
        model.quantize("bf16", keep_float32=["*.fc2"])


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_quantize_in_training_mode_is_refused(mode):
    model, _ = make_model("sequence_classification")
    model.train()
    with pytest.raises(RuntimeError, match=r"in training mode; call model.eval\(\) first"):
        model.quantize(mode)


@pytest.mark.parametrize("first, second", [("int8", "int8"), ("int8", "bf16"), ("bf16", "int8"), ("bf16", "bf16")])
def test_quantizing_twice_is_refused(first, second):
    model, _ = make_model("sequence_classification")
    model.quantize(first)
    with pytest.raises(RuntimeError, match=f"already quantized \\('{first}'\\).*Load the float32 model again"):
        model.quantize(second)


@pytest.mark.parametrize("second", ["int8", "bf16"])
def test_bf16_undone_by_float_is_a_float32_model_again(second):
    """quantization_mode follows the model: after quantize('bf16') then model.float() it is None, in the inner stacks
    too, and the model quantizes again (it was refused as "already quantized ('bf16')")."""
    model, inputs = make_model("seq2seq_lm")
    model.quantize("bf16")
    stacks = [module for module in model.modules() if hasattr(module, "save_pretrained")]
    assert len(stacks) == 4 and {stack.quantization_mode for stack in stacks} == {"bf16"}
    model.to("cpu")  # a move keeps the dtype, and the mode
    assert {stack.quantization_mode for stack in stacks} == {"bf16"}
    model.float()
    assert {stack.quantization_mode for stack in stacks} == {None}
    expected = float_outputs(model, inputs)  # the float32 model of bfloat16-rounded weights
    assert model.quantize(second) is model
    assert {stack.quantization_mode for stack in stacks} == {second}
    errors = largest_relative_error(expected, float_outputs(model, inputs))
    assert 0 < max(errors.values()) <= {"int8": INT8_RELATIVE_TOLERANCE, "bf16": BF16_RELATIVE_TOLERANCE}[second]


def test_bf16_turned_to_float16_is_no_longer_bf16_and_is_refused_as_float16():
    model, _ = make_model("sequence_classification")
    model.quantize("bf16")
    model.half()
    assert model.quantization_mode is None
    with pytest.raises(ValueError, match=r"starts from float32 weights, but .* holds \['float16'\]"):
        model.quantize("int8")


CONVERSIONS = {
    "to_bfloat16": lambda module: module.to(torch.bfloat16),
    "to_dtype_float16": lambda module: module.to("cpu", dtype=torch.float16),
    "half": lambda module: module.half(),
    "bfloat16": lambda module: module.bfloat16(),
    "double": lambda module: module.double(),
    "type": lambda module: module.type(torch.bfloat16),
}


@pytest.mark.parametrize("part", ["model", "encoder_stack", "embeddings", "int8_layer"])
@pytest.mark.parametrize("conversion", sorted(CONVERSIONS))
def test_int8_dtype_change_is_refused_before_anything_converts(conversion, part):
    """Accepted, it converted the embeddings and LayerNorms but not the int8 layers, and the next forward failed in an
    int8 layer: "expected scalar type Float but found BFloat16"."""
    model, inputs = make_model("sequence_classification")
    model.quantize("int8")
    expected = float_outputs(model, inputs)
    dtypes = {name: tensor.dtype for name, tensor in (*model.named_parameters(), *model.named_buffers())}
    converted = {
        "model": model,
        "encoder_stack": model.model.encoder,
        "embeddings": model.model.encoder.embeddings,
        "int8_layer": model.classifier,
    }[part]
    with pytest.raises(
        RuntimeError,
        match=r"belongs to a model quantized with model\.quantize\('int8'\), .* cannot be converted to torch\.\w+ .*"
        r"nothing was converted\. Keep the int8 model in float32; .* model\.quantize\('bf16'\) instead",
    ):
        CONVERSIONS[conversion](converted)
    assert {name: tensor.dtype for name, tensor in (*model.named_parameters(), *model.named_buffers())} == dtypes
    assert model.quantization_mode == "int8"
    for name, value in float_outputs(model, inputs).items():
        assert torch.equal(value, expected[name]), name
    # What keeps the dtype is still allowed.
    assert model.float() is model and model.to("cpu") is model and model.to(torch.float32) is model
    assert model.quantization_mode == "int8"


def test_quantize_of_a_model_not_in_float32_is_refused():
    model, _ = make_model("model")
    model.half()
    with pytest.raises(ValueError, match=r"starts from float32 weights, but SelfAttnModel holds \['float16'\]"):
        model.quantize("bf16")


def test_int8_of_a_model_off_the_cpu_is_refused():
    # A GPU is not needed to reach the check: any device but the CPU is refused the same way.
    model, _ = make_model("model")
    model.to("meta")
    with pytest.raises(ValueError, match=r"needs the model on CPU.*'meta'.*runs on CPU only.*quantize\('bf16'\)"):
        model.quantize("int8")


def test_int8_training_is_refused():
    model, inputs = make_model("sequence_classification")
    model.quantize("int8")
    with pytest.raises(RuntimeError, match="for inference only.*no gradient would pass through"):
        model.train()
    with pytest.raises(RuntimeError, match="for inference only"):
        model.model.train()  # the inner stacks too
    assert not model.training
    model.eval()  # still allowed
    assert not any(parameter.requires_grad for parameter in model.parameters())
    # Re-enabling gradients by hand, as a training loop or an adapter library would, is refused at the first int8 layer.
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    with pytest.raises(RuntimeError, match="requires a gradient.*for inference only"):
        model(**inputs, labels=torch.tensor([0, 1]))
    # Inference outside torch.no_grad() still works.
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    assert model(**inputs).logits.shape == (2, 3)


def test_int8_forward_on_another_device_is_refused():
    layer = Int8DynamicLinear(4, 3)
    with pytest.raises(RuntimeError, match="runs on CPU only"):
        layer(torch.zeros(2, 4, device="meta"))


def test_int8_layer_takes_an_input_that_requires_a_gradient_where_gradients_are_off():
    layer = Int8DynamicLinear(4, 3)
    inputs = torch.randn(2, 4, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(layer(inputs), layer(inputs.detach()))


def test_int8_save_and_push_are_refused(tmp_path):
    model, _ = make_model("seq2seq_lm")
    model.quantize("int8")
    for save in (model.save_pretrained, model.model.save_pretrained):
        with pytest.raises(RuntimeError, match=r"Save the float32 model instead.*quantize\('int8'\) after loading"):
            save(tmp_path / "int8")
    with pytest.raises(RuntimeError, match="Save the float32 model instead"):
        model.push_to_hub("someone/int8-model")
    assert not (tmp_path / "int8").exists()


def test_a_model_with_an_int8_part_refuses_save_and_push_before_writing_anything(tmp_path, monkeypatch):
    # Quantizing a part (the encoder stack, as test_defaults_apply_to_an_encoder_stack_quantized_on_its_own does)
    # leaves the outer model's quantization_mode None; its save had failed in transformers' tied-weight check after
    # config.json and the code were written.
    model, _ = make_model("sequence_classification")
    model.model.encoder.quantize("int8")
    created = []
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kwargs: created.append(repo_id) or 1 / 0)
    for saved, holder in (
        (model, r"SelfAttnForSequenceClassification holds int8 layers \(model\.encoder\.layers\.0\..* more\)"),
        (model.model, r"SelfAttnModel holds int8 layers \(encoder\.layers\.0\..* more\)"),
        (model.model.encoder, r"SelfAttnEncoder was quantized with model\.quantize\('int8'\)"),
    ):
        with pytest.raises(RuntimeError, match=rf"save_pretrained: {holder}.*nothing was written.*float32 model"):
            saved.save_pretrained(tmp_path / "int8")
        with pytest.raises(RuntimeError, match=rf"save_pretrained: {holder}"):
            saved.save_pretrained(tmp_path / "int8", push_to_hub=True, repo_id="someone/int8-model")
        with pytest.raises(RuntimeError, match=rf"push_to_hub: {holder}"):
            saved.push_to_hub("someone/int8-model")
    assert not (tmp_path / "int8").exists() and created == []


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # torch.load of a pickled model
def test_int8_model_survives_deepcopy_and_pickling(tmp_path, int8_kernel):
    # torch.save(model) is how torch's own quantized models are kept; the copy computes the same and still refuses.
    model, inputs = make_model("seq2seq_lm")
    model.quantize("int8")
    torch.save(model, tmp_path / "int8.pt")
    for copied in (copy.deepcopy(model), torch.load(tmp_path / "int8.pt", weights_only=False)):
        torch.testing.assert_close(copied(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5)
        assert copied.quantization_mode == "int8"
        with pytest.raises(RuntimeError, match="for inference only"):
            copied.train()
        with pytest.raises(RuntimeError, match="Save the float32 model instead"):
            copied.save_pretrained(tmp_path / "copy")
        with pytest.raises(RuntimeError, match="cannot be converted to torch.float16"):
            copied.half()


def test_bf16_saves_and_reloads(tmp_path):
    model, inputs = make_model("seq2seq_lm")
    model.quantize("bf16")
    model.save_pretrained(tmp_path)
    reloaded = SelfAttnForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.dtype == torch.bfloat16
    reloaded_state = reloaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded_state[name], tensor), name
    expected, actual = float_outputs(model, inputs), float_outputs(reloaded, inputs)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=3e-2, msg=key)  # bfloat16 outputs


# Run by run_without_package: a remote-code model, quantized where the package cannot be imported.
QUANTIZE_SCRIPT = r"""
import torch, transformers
model = transformers.AutoModelForSequenceClassification.from_pretrained(job["folder"], trust_remote_code=True).eval()
inputs = torch.load(job["inputs"])
model.quantize("int8")
with torch.no_grad():
    torch.save(model(**inputs).logits, job["outputs"])
# Saving is refused for the whole model quantized and for one with a part quantized, before anything is written.
part = transformers.AutoModelForSequenceClassification.from_pretrained(job["folder"], trust_remote_code=True).eval()
part.model.encoder.quantize("int8")
refusals = []
for quantized, folder in ((model, job["saved"]), (part, job["saved_part"])):
    try:
        quantized.save_pretrained(folder)
    except RuntimeError as error:
        refusals.append(str(error))
import os
report(
    classifier=type(model.classifier).__name__,
    refusals=refusals,
    written=[os.path.exists(folder) for folder in (job["saved"], job["saved_part"])],
)
"""


def test_quantize_works_as_remote_code(tmp_path):
    """save_pretrained ships quantization.py (model.py imports it), and a model loaded with trust_remote_code=True
    where the package cannot be imported quantizes to the same outputs."""
    model, inputs = make_model("sequence_classification")
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "quantization.py").is_file()
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = copy.deepcopy(model).quantize("int8")(**inputs).logits
    job = {
        "folder": str(tmp_path / "model"),
        "inputs": str(tmp_path / "inputs.pt"),
        "outputs": str(tmp_path / "outputs.pt"),
        "saved": str(tmp_path / "int8"),
        "saved_part": str(tmp_path / "int8-part"),
    }
    result = run_without_package(QUANTIZE_SCRIPT, job, tmp_path)
    assert result["classifier"] == "Int8DynamicLinear"
    assert len(result["refusals"]) == 2 and result["written"] == [False, False], result
    assert "was quantized with model.quantize('int8')" in result["refusals"][0]
    assert "holds int8 layers (model.encoder.layers.0." in result["refusals"][1]
    torch.testing.assert_close(torch.load(tmp_path / "outputs.pt"), expected, rtol=0, atol=1e-6)


def test_int8_layers_are_found_by_their_id_when_made_copied_or_unpickled_and_only_while_they_live():
    layer = int8_linear(nn.Linear(16, 8), reduce_range=False)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(layer), torch.load(buffer, weights_only=False)]
    x = torch.randn(3, 16)
    operator = getattr(torch.ops.selfattn, quantization.INT8_LAYER_OPERATOR)
    for each in (layer, *copies):
        assert quantization.INT8_LAYERS[id(each)] is each
        with torch.no_grad():
            assert torch.equal(operator(x, id(each), 8), each(x))
    key = id(copies[0])
    del copies
    gc.collect()
    assert key not in quantization.INT8_LAYERS
    with pytest.raises(RuntimeError, match=f"no int8 layer with id {key} is alive"):
        operator(x, key, 8)


def test_the_int8_operator_runs_the_eager_layer_whatever_compiles_elsewhere(monkeypatch):
    # While a graph is being traced (in any thread), the operator's kernel still runs the eager layer, never itself.
    layer = int8_linear(nn.Linear(16, 8), reduce_range=False)
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = layer(x)
        monkeypatch.setattr(quantization, "in_compiled_graph", lambda: True)
        assert torch.equal(getattr(torch.ops.selfattn, quantization.INT8_LAYER_OPERATOR)(x, id(layer), 8), expected)


def test_a_compiled_int8_layer_refuses_an_input_that_requires_a_gradient():
    torch._dynamo.reset()
    layer = int8_linear(nn.Linear(16, 8), reduce_range=False)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))
    with pytest.raises(RuntimeError, match="requires a gradient"):
        compiled(torch.randn(3, 16, requires_grad=True))


def test_a_reloaded_module_keeps_its_operators_and_finds_the_layers_made_before():
    script = """
import gc, importlib, torch
from modeling_selfattn import kernels, quantization
layer = quantization.int8_linear(torch.nn.Linear(16, 8), reduce_range=False)
x = torch.randn(3, 16)
with torch.no_grad():
    expected = layer(x)
    for module in (kernels, quantization):
        importlib.reload(module)
    gc.collect()  # a Library that nothing holds unregisters its operators when collected
    assert hasattr(torch.ops.selfattn, "onednn_linear")
    operator = getattr(torch.ops.selfattn, quantization.INT8_LAYER_OPERATOR)
    assert torch.equal(operator(x, id(layer), 8), expected)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_int8_of_a_model_with_peft_adapters_is_refused():
    peft = pytest.importorskip("peft")
    model, inputs = make_model("sequence_classification")
    adapted = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS")).eval()
    message = r"quantize\('int8'\): .*q_proj holds PEFT adapters \(Linear\).*merge_and_unload\(\)"
    with pytest.raises(ValueError, match=message):
        model.quantize("int8")
    assert not any(isinstance(module, nn.quantized.dynamic.Linear) for module in model.modules())
    # merged first, int8 runs
    merged = adapted.merge_and_unload().quantize("int8")
    with torch.no_grad():
        assert merged(**inputs).logits.isfinite().all()


def test_bf16_model_is_freed_on_del_without_gc():
    """quantize('bf16') put a functools.partial holding each module in that module's _apply: a reference cycle that
    kept the model alive after `del model` until gc.collect(). bf16 needs no hook: its quantization_mode judges the
    dtypes, and stays truthful after model.float()."""
    import weakref

    model, _ = make_model("seq2seq_lm")
    model.quantize("bf16")
    assert model.quantization_mode == "bf16"
    model.float()
    assert model.quantization_mode is None and quantization.quantization_state(model) is None
    model.bfloat16()
    reference = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert reference() is None
    finally:
        gc.enable()
