"""ONNX export of selfattn models (`selfattn-convert onnx`, modeling_selfattn/convert_cli.py), in the file layout and
with the input and output names of Hugging Face optimum, so that ONNX Runtime users (optimum's ORTModel classes
included) find what they expect:

- encoder heads: `model.onnx`, inputs input_ids, attention_mask and (where the model has token types)
  token_type_ids, outputs named after the head's output fields (last_hidden_state, logits, start_logits/end_logits,
  ...), batch and sequence axes dynamic;
- the encoder-decoder: `encoder_model.onnx`, `decoder_model.onnx` (no cache in; the cache out) and
  `decoder_with_past_model.onnx` (past_key_values.N.{decoder,encoder}.{key,value} in, present.N.decoder.{key,value}
  out: the cross-attention keys and values do not change while decoding, so optimum's graph does not return them);
- the decoder-only LM: one `model.onnx` taking past_key_values.N.{key,value} (0 tokens long at the first step) and
  returning present.N.{key,value}, as optimum exports decoders now.

Package-only. The graphs are traced with the TorchScript exporter (torch.onnx.export(..., dynamo=False)) from a
model with eager attention: on that graph ONNX Runtime's transformer optimizer fuses attention, LayerNorm and GELU
(it fuses none on a graph traced through SDPA). Tracing runs the padded path (the model never unpads under
tracing), and keeps the padding rule: where attention_mask is 0, last_hidden_state is the embedding output.
onnx and onnxruntime are optional (`pip install 'selfattn[onnx]'`); importing this module needs neither.
"""

import importlib.util
import json
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from . import model as modeling
from .checkpoints import ConversionError
from .argument_values import shown
from .config import attention_key
from .output_folder import remove, swap_files_in, unique_sibling

# 17: the first opset with LayerNormalization as one operator, which the optimizer's fusions start from.
OPSET = 17
REQUIRED_MODULES = ("onnx", "onnxruntime")
INSTALL_HINT = "pip install 'selfattn[onnx]' (onnx and onnxruntime)"

TOKENS = {0: "batch_size", 1: "sequence_length"}
SEQUENCES = {0: "batch_size"}

# Every encoder head: its outputs as the ONNX graph names them (the fields of its ModelOutput, which are also
# optimum's names) and their dynamic axes. tests/test_onnx_export.py checks that every encoder head of
# heads.HEADS is here.
ENCODER_HEAD_OUTPUTS: dict[str, dict[str, dict[int, str]]] = {
    # pooler_output only where the model has a pooler (config.add_pooling_layer).
    "SelfAttnModel": {"last_hidden_state": TOKENS, "pooler_output": SEQUENCES},
    "SelfAttnForMaskedLM": {"logits": TOKENS},
    "SelfAttnForSequenceClassification": {"logits": SEQUENCES},
    "SelfAttnForTokenClassification": {"logits": TOKENS},
    "SelfAttnForQuestionAnswering": {"start_logits": TOKENS, "end_logits": TOKENS},
    "SelfAttnForMultipleChoice": {"logits": {0: "batch_size", 1: "num_choices"}},
    "SelfAttnForPreTraining": {"prediction_logits": TOKENS, "seq_relationship_logits": SEQUENCES},
    "SelfAttnForReplacedTokenDetection": {"logits": TOKENS},
}
GENERATING_HEADS = ("SelfAttnForConditionalGeneration", "SelfAttnForCausalLM")
SUPPORTED_CLASSES = (*ENCODER_HEAD_OUTPUTS, *GENERATING_HEADS)


def missing_modules() -> list[str]:
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def require_onnx_runtime() -> None:
    missing = missing_modules()
    if missing:
        raise ConversionError(f"ONNX export needs {', '.join(missing)}, which is not installed: {INSTALL_HINT}.")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_for_export(folder: str | Path) -> modeling.SelfAttnPreTrainedModel:
    """The model saved in `folder` (a selfattn folder), as the class its config.json names, in eval mode and with
    eager attention for tracing. Raises ConversionError naming what is wrong and the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(
            f"MODEL {folder} is not a folder; pass a selfattn model folder (what save_pretrained or "
            "`selfattn-convert bert|seq2seq` write)."
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(
            f"MODEL {folder} has no config.json, so it holds no saved model; pass a selfattn model folder (what "
            "save_pretrained or `selfattn-convert bert|seq2seq` write)."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(
            f"MODEL {folder}: config.json is not valid JSON ({error}); save the model again."
        ) from error
    model_type = config.get("model_type")
    if model_type != "selfattn":
        raise ConversionError(
            f"MODEL {folder} holds a {model_type!r} checkpoint, not a selfattn one; convert it first with "
            "`selfattn-convert bert` (BERT family) or `selfattn-convert seq2seq` (Marian, BART), then export that."
        )
    class_name = (config.get("architectures") or ["SelfAttnModel"])[0]
    if class_name not in SUPPORTED_CLASSES:
        raise ConversionError(
            f"MODEL {folder} holds a {class_name}, which is not a selfattn head; the ONNX export takes "
            f"{', '.join(SUPPORTED_CLASSES)}. Check the architectures entry of its config.json."
        )
    model = getattr(modeling, class_name).from_pretrained(folder, attn_implementation="eager")
    check_exportable(model)
    return model.eval()


def check_exportable(model: nn.Module) -> None:
    class_name = type(model).__name__
    if class_name not in SUPPORTED_CLASSES:
        raise ConversionError(
            f"The ONNX export does not support {class_name}; it exports {', '.join(SUPPORTED_CLASSES)}."
        )
    config = model.config
    if class_name == "SelfAttnModel" and config.decoder_layers > 0:
        shape = "an encoder-decoder" if config.encoder_layers > 0 else "a decoder-only"
        head = "SelfAttnForConditionalGeneration" if config.encoder_layers > 0 else "SelfAttnForCausalLM"
        raise ConversionError(
            f"This SelfAttnModel is {shape} model without an LM head; the ONNX export takes the bare model of "
            f"encoder-only configs only. Export the {head} instead."
        )
    refuse_quantized(model)
    headless = [key for key, heads in (config.pruned_heads or {}).items() if len(heads) == config.num_attention_heads]
    if headless:
        # Refused here, before any file or folder is made: the crash ends the process, leaving its staging folders.
        raise ConversionError(
            f"The ONNX export does not take attentions that lost all their heads, and {', '.join(headless)} did "
            "(config.pruned_heads): torch's TorchScript exporter crashes the process (floating point exception) on "
            "their projections, which have no outputs. Keep at least one head in each attention (prune_heads with "
            "fewer of its heads) to export the model."
        )


def refuse_quantized(model: nn.Module) -> None:
    """Refuse int8 and bfloat16 models before anything is traced: neither can become a graph that ONNX Runtime runs on
    the CPU, where the export checks it, and the failure would come late and read as a gap in this module."""
    # Imported here, as model.py imports it: only models that quantize load quantization.py.
    from .quantization import int8_layer_names

    class_name = type(model).__name__
    int8_layers = int8_layer_names(model)
    if int8_layers:
        raise ConversionError(
            f"The ONNX export does not take int8 models, and {class_name} holds int8 layers ({shown(int8_layers, 1)}) "
            "from model.quantize('int8'): torch's TorchScript exporter has no ONNX operator for their packed int8 "
            "weights (quantized::linear_dynamic). Export the float32 model (before quantize('int8'), or loaded "
            "again), then quantize the graph with ONNX Runtime: onnxruntime.quantization.quantize_dynamic("
            "'model.onnx', 'model_int8.onnx', per_channel=True, weight_type=QuantType.QInt8), int8 weights with one "
            "scale per output channel as quantize('int8') makes them."
        )
    bf16 = [
        name
        for name, tensor in (*model.named_parameters(), *model.named_buffers())
        if tensor.dtype == torch.bfloat16
    ]
    if bf16:
        how = "was quantized with model.quantize('bf16')" if model.quantization_mode == "bf16" else "is bfloat16"
        raise ConversionError(
            f"The ONNX export does not take bfloat16 models, and {class_name} {how} ({shown(bf16, 1)}): ONNX "
            "Runtime's CPU provider has no bfloat16 kernels for the graph's operators (Add among them), so the "
            "graph could neither be checked against PyTorch nor run on the CPU. Export the float32 model: the model "
            "before quantize('bf16') (or after model.float()); a bfloat16 model folder loaded with "
            "from_pretrained(folder, dtype=torch.float32) and saved again."
        )


# ---------------------------------------------------------------------------------------------------------------
# The graphs: modules whose positional inputs and flat tuple of outputs are the ONNX graph's


class EncoderHeadGraph(nn.Module):
    def __init__(self, model: nn.Module, output_names: Sequence[str], with_token_types: bool):
        super().__init__()
        self.model, self.output_names, self.with_token_types = model, tuple(output_names), with_token_types

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
        if self.with_token_types:
            inputs["token_type_ids"] = token_type_ids
        outputs = self.model(**inputs, return_dict=True)
        return tuple(outputs[name] for name in self.output_names)


class Seq2SeqEncoderGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, input_ids, attention_mask):
        return (self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state,)


def layer_tensors(cache: DynamicCache) -> list[torch.Tensor]:
    return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]


class Seq2SeqDecoderGraph(nn.Module):
    """One decoding step of the encoder-decoder. Without past: (input_ids, encoder_attention_mask,
    encoder_hidden_states) -> logits and the whole cache. With past: (input_ids, encoder_attention_mask, then per
    layer the self-attention key and value and the cross-attention key and value) -> logits and the grown
    self-attention cache."""

    def __init__(self, model: nn.Module, with_past: bool):
        super().__init__()
        self.model, self.with_past = model, with_past

    def forward(self, input_ids, encoder_attention_mask, *rest):
        config = self.model.config
        if self.with_past:
            self_past = [(rest[i], rest[i + 1]) for i in range(0, len(rest), 4)]
            cross_past = [(rest[i + 2], rest[i + 3]) for i in range(0, len(rest), 4)]
            cache = EncoderDecoderCache(
                DynamicCache(self_past, config=config), DynamicCache(cross_past, config=config)
            )
            # With past, cross-attention reads its keys and values from the cache; the decoder still takes the
            # encoder output, but uses only its shape (batch, source length, hidden_size) for the cross-attention
            # mask. The encoder attention mask gives batch and source length without another graph input, whatever
            # heads pruning left (the cached keys hold none where an attention lost them all).
            encoder_hidden_states = (
                encoder_attention_mask[..., None].to(self.model.dtype).expand(-1, -1, config.hidden_size)
            )
        else:
            cache, encoder_hidden_states = None, rest[0]
        outputs = self.model(
            attention_mask=encoder_attention_mask,
            decoder_input_ids=input_ids,
            encoder_outputs=(encoder_hidden_states,),
            cache=cache,
            use_cache=True,
            return_dict=True,
        )
        self_cache = outputs.cache.self_attention_cache
        cross_cache = outputs.cache.cross_attention_cache
        presents = []
        for self_layer, cross_layer in zip(self_cache.layers, cross_cache.layers):
            presents += [self_layer.keys, self_layer.values]
            if not self.with_past:
                presents += [cross_layer.keys, cross_layer.values]
        return (outputs.logits, *presents)


class CausalLMGraph(nn.Module):
    """(input_ids, attention_mask over past and new tokens, position_ids of the new tokens, then per layer the past
    key and value) -> logits and the grown cache. The positions are an input, as in optimum's decoders, because
    generate() counts them from the attention mask: left-padded prompts then start at position 0."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache([(past[i], past[i + 1]) for i in range(0, len(past), 2)], config=self.model.config)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            return_dict=True,
        )
        return (outputs.logits, *layer_tensors(outputs.cache))


# ---------------------------------------------------------------------------------------------------------------
# Example inputs: for tracing, and for checking the graphs on other shapes


def random_ids(config, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Token ids other than the padding id (padding-aware positions count real tokens by it)."""
    ids = torch.randint(0, config.vocab_size, shape, generator=generator)
    if config.pad_token_id is not None:
        ids = torch.where(ids == config.pad_token_id, (config.pad_token_id + 1) % config.vocab_size, ids)
    return ids


def padded_mask(batch_size: int, length: int, left_padding: bool = True) -> torch.Tensor:
    """Row 0 full, the others shorter by one more token each (at least one token): a padded batch, so that the
    traced graph keeps the mask (a batch without padding may let the mask be skipped). Row 1 is padded at the end,
    rows from 2 on at the start (unless not `left_padding`: the heads whose output is the first position refuse
    it), so that the check (check_shapes, 3 rows) covers both sides: a graph that assumes one, as ONNX Runtime's
    BERT optimizer does by default (lengths for the mask, right padding only), fails it."""
    lengths = torch.tensor([max(1, length - row) for row in range(batch_size)]).unsqueeze(1)
    positions = torch.arange(length).unsqueeze(0)
    at_start = (torch.arange(batch_size) >= (2 if left_padding else batch_size)).unsqueeze(1)
    return torch.where(at_start, positions >= length - lengths, positions < lengths).long()


def encoder_inputs(model, batch_size: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, length)
    if type(model).__name__ == "SelfAttnForMultipleChoice":
        shape = (batch_size, 2, length)
    mask = padded_mask(batch_size, length, left_padding=getattr(model, "first_position_output", None) is None)
    mask = mask.unsqueeze(1).expand(shape).contiguous() if len(shape) == 3 else mask
    ids = random_ids(config, shape, generator)
    if config.pad_token_id is not None:
        ids = ids.masked_fill(mask == 0, config.pad_token_id)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if config.type_vocab_size > 0:
        types = torch.randint(0, config.type_vocab_size, shape, generator=generator)
        inputs["token_type_ids"] = types * mask
    return inputs


def past_inputs(model, mask: torch.Tensor, past_length: int, seed: int, positions=None) -> list[torch.Tensor]:
    """A real cache of `past_length` decoded tokens (from the model itself), flat in the graph's order. `mask` is the
    source's attention mask for the encoder-decoder, the past tokens' (with `positions`) for the causal LM."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    batch_size = mask.shape[0]
    ids = random_ids(config, (batch_size, past_length), generator)
    with torch.no_grad():
        if type(model).__name__ == "SelfAttnForCausalLM":
            outputs = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            return layer_tensors(outputs.cache)
        source = random_ids(config, tuple(mask.shape), generator)
        outputs = model(input_ids=source, attention_mask=mask, decoder_input_ids=ids, use_cache=True)
    cache = outputs.cache
    flat = []
    for self_layer, cross_layer in zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers):
        flat += [self_layer.keys, self_layer.values, cross_layer.keys, cross_layer.values]
    return flat


# ---------------------------------------------------------------------------------------------------------------
# Graphs to export: each with its file, names, axes and a way to make example inputs of any size


# The graphs' files (optimum's names): encoder heads and causal LMs export one graph, encoder-decoders three; --optimize
# adds ONNX Runtime's fused graph.
MODEL_GRAPH = "model.onnx"
ENCODER_GRAPH = "encoder_model.onnx"
DECODER_GRAPH = "decoder_model.onnx"
DECODER_WITH_PAST_GRAPH = "decoder_with_past_model.onnx"
OPTIMIZED_GRAPH = "model_optimized.onnx"
GRAPH_FILES = (MODEL_GRAPH, ENCODER_GRAPH, DECODER_GRAPH, DECODER_WITH_PAST_GRAPH, OPTIMIZED_GRAPH)


@dataclass(frozen=True)
class GraphSpec:
    file_name: str
    module: nn.Module
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    # (batch_size, length, seed) -> the inputs, in the order of input_names
    example: Callable[[int, int, int], tuple[torch.Tensor, ...]]
    # (batch_size, length) of the check against PyTorch: other sizes than the traced ones (TRACE_SHAPE), so that a
    # size the tracer fixed by mistake shows up as an error or a difference.
    check_shapes: tuple[tuple[int, int], ...] = ((3, 4),)


def encoder_head_spec(model) -> GraphSpec:
    class_name = type(model).__name__
    outputs = dict(ENCODER_HEAD_OUTPUTS[class_name])
    if class_name == "SelfAttnModel" and model.pooler is None:
        outputs.pop("pooler_output")
    with_token_types = model.config.type_vocab_size > 0
    input_names = ("input_ids", "attention_mask", "token_type_ids")[: 3 if with_token_types else 2]
    input_axes = TOKENS
    if class_name == "SelfAttnForMultipleChoice":
        input_axes = {0: "batch_size", 1: "num_choices", 2: "sequence_length"}

    def example(batch_size, length, seed):
        inputs = encoder_inputs(model, batch_size, length, seed)
        return tuple(inputs[name] for name in input_names)

    return GraphSpec(
        MODEL_GRAPH,
        EncoderHeadGraph(model, tuple(outputs), with_token_types),
        input_names,
        tuple(outputs),
        {**{name: input_axes for name in input_names}, **outputs},
        example,
    )


def seq2seq_specs(model) -> list[GraphSpec]:
    config = model.config
    layers = range(config.decoder_layers)
    source_axes = {0: "batch_size", 1: "encoder_sequence_length"}

    def encoder_example(batch_size, length, seed):
        generator = torch.Generator().manual_seed(seed)
        mask = padded_mask(batch_size, length)
        ids = random_ids(config, (batch_size, length), generator)
        if config.pad_token_id is not None:
            ids = ids.masked_fill(mask == 0, config.pad_token_id)
        return ids, mask

    def decoder_example(batch_size, length, seed):
        ids, mask = encoder_example(batch_size, length + 2, seed)
        with torch.no_grad():
            encoded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        target = random_ids(config, (batch_size, length), torch.Generator().manual_seed(seed + 1))
        return target, mask, encoded

    def with_past_example(batch_size, length, seed):
        _, mask = encoder_example(batch_size, length + 2, seed)
        target = random_ids(config, (batch_size, 1), torch.Generator().manual_seed(seed + 1))
        return (target, mask, *past_inputs(model, mask, length, seed))

    # optimum's names and axes: decoder_model.onnx returns the whole cache; decoder_with_past_model.onnx takes it
    # and returns the self-attention part only (the cross-attention part does not change).
    past_axes, present_axes, with_past_present_axes = {}, {}, {}
    for layer in layers:
        for part in ("key", "value"):
            past_axes[f"past_key_values.{layer}.decoder.{part}"] = {0: "batch_size", 2: "past_decoder_sequence_length"}
            present_axes[f"present.{layer}.decoder.{part}"] = {0: "batch_size", 2: "decoder_sequence_length"}
            with_past_present_axes[f"present.{layer}.decoder.{part}"] = {
                0: "batch_size",
                2: "past_decoder_sequence_length + 1",
            }
        for part in ("key", "value"):
            past_axes[f"past_key_values.{layer}.encoder.{part}"] = {0: "batch_size", 2: "encoder_sequence_length_out"}
            present_axes[f"present.{layer}.encoder.{part}"] = {0: "batch_size", 2: "encoder_sequence_length_out"}
    return [
        GraphSpec(
            ENCODER_GRAPH,
            Seq2SeqEncoderGraph(model),
            ("input_ids", "attention_mask"),
            ("last_hidden_state",),
            {"input_ids": source_axes, "attention_mask": source_axes, "last_hidden_state": source_axes},
            encoder_example,
        ),
        GraphSpec(
            DECODER_GRAPH,
            Seq2SeqDecoderGraph(model, with_past=False),
            ("input_ids", "encoder_attention_mask", "encoder_hidden_states"),
            ("logits", *present_axes),
            {
                "input_ids": {0: "batch_size", 1: "decoder_sequence_length"},
                "encoder_attention_mask": source_axes,
                "encoder_hidden_states": source_axes,
                "logits": {0: "batch_size", 1: "decoder_sequence_length"},
                **present_axes,
            },
            decoder_example,
        ),
        GraphSpec(
            DECODER_WITH_PAST_GRAPH,
            Seq2SeqDecoderGraph(model, with_past=True),
            ("input_ids", "encoder_attention_mask", *past_axes),
            ("logits", *with_past_present_axes),
            {
                "input_ids": {0: "batch_size"},
                "encoder_attention_mask": source_axes,
                "logits": {0: "batch_size"},
                **past_axes,
                **with_past_present_axes,
            },
            with_past_example,
        ),
    ]


def causal_lm_spec(model) -> GraphSpec:
    config = model.config
    past_names, present_names, axes = [], [], {}
    for layer in range(config.decoder_layers):
        for part in ("key", "value"):
            past_names.append(f"past_key_values.{layer}.{part}")
            present_names.append(f"present.{layer}.{part}")
            axes[past_names[-1]] = {0: "batch_size", 2: "past_sequence_length"}
            axes[present_names[-1]] = {0: "batch_size", 2: "past_sequence_length + sequence_length"}

    def example(batch_size, length, seed):
        # `length` tokens in all: a past of length // 2 (none for one token, the first step of generation) and the
        # new tokens after it. Rows after the first are left-padded in the past, as generate() pads prompts, with
        # positions counted from the mask as generate() counts them.
        generator = torch.Generator().manual_seed(seed)
        past_length = length // 2
        mask = torch.ones(batch_size, length, dtype=torch.long)
        for row in range(1, batch_size):
            mask[row, : min(row, max(0, past_length - 1))] = 0  # keeps at least one real past token
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids = random_ids(config, (batch_size, length - past_length), generator)
        if past_length == 0:
            # Each layer's own head count: prune_heads may have left layers different numbers of heads.
            past = [
                torch.zeros(batch_size, len(config.kept_heads(attention_key("decoder", layer))), 0, config.head_dim)
                for layer in range(config.decoder_layers)
                for _ in ("key", "value")
            ]
        else:
            past = past_inputs(model, mask[:, :past_length], past_length, seed, positions[:, :past_length])
        return (ids, mask, positions[:, past_length:], *past)

    return GraphSpec(
        MODEL_GRAPH,
        CausalLMGraph(model),
        ("input_ids", "attention_mask", "position_ids", *past_names),
        ("logits", *present_names),
        {
            "input_ids": TOKENS,
            "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
            "position_ids": TOKENS,
            "logits": TOKENS,
            **axes,
        },
        example,
        check_shapes=((3, 4), (3, 1)),
    )


def graph_specs(model) -> list[GraphSpec]:
    check_exportable(model)
    class_name = type(model).__name__
    if class_name == "SelfAttnForConditionalGeneration":
        specs = seq2seq_specs(model)
    elif class_name == "SelfAttnForCausalLM":
        specs = [causal_lm_spec(model)]
    else:
        specs = [encoder_head_spec(model)]
    for spec in specs:
        # torch.onnx.export traces in eval mode and then puts the module back in the mode it had, recursively: a
        # wrapper left in train mode (the default of a new module) would turn the model's dropout back on.
        spec.module.eval()
    return specs


# ---------------------------------------------------------------------------------------------------------------
# Export, check, optimize

# (batch_size, length) of the traced inputs.
TRACE_SHAPE = (2, 6)


def export_graph(spec: GraphSpec, folder: Path) -> Path:
    path = Path(folder) / spec.file_name
    inputs = spec.example(*TRACE_SHAPE, seed=0)
    try:
        with warnings.catch_warnings():
            # The tracer warns about every Python-side check on tensor values (the model's input checks, which are
            # not part of the graph) and the TorchScript exporter about its own deprecation.
            warnings.simplefilter("ignore")
            with torch.no_grad():
                torch.onnx.export(
                    spec.module,
                    inputs,
                    str(path),
                    input_names=list(spec.input_names),
                    output_names=list(spec.output_names),
                    dynamic_axes=spec.dynamic_axes,
                    opset_version=OPSET,
                    do_constant_folding=True,
                    dynamo=False,
                )
    except OSError:
        raise
    except Exception as error:
        raise ConversionError(
            f"torch.onnx.export could not export {spec.file_name} ({type(error).__name__}: {error}); nothing is "
            "written. This is a gap in modeling_selfattn/onnx_export.py: please report it with this message."
        ) from error
    return path


def session(path: Path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_session(ort_session, input_names: Sequence[str], inputs: Sequence[torch.Tensor]) -> list:
    return ort_session.run(None, {name: tensor.numpy() for name, tensor in zip(input_names, inputs)})


def max_differences(spec: GraphSpec, path: Path) -> dict:
    """Max abs difference between ONNX Runtime on `path` and PyTorch, per output, over inputs of spec.check_shapes."""
    ort_session = session(path)
    # The exporter leaves out inputs the traced graph does not read: users would then get an error for passing them
    # (or, worse, a graph that ignores e.g. the attention mask).
    graph_inputs = tuple(entry.name for entry in ort_session.get_inputs())
    if graph_inputs != spec.input_names:
        raise ConversionError(
            f"{path.name} takes the inputs {list(graph_inputs)}, not {list(spec.input_names)}: the traced graph "
            "ignores some of them; nothing is written. This is a gap in modeling_selfattn/onnx_export.py: please "
            "report it."
        )
    differences = {}
    for index, (batch_size, length) in enumerate(spec.check_shapes):
        inputs = spec.example(batch_size, length, seed=100 + index)
        with torch.no_grad():
            expected = spec.module(*inputs)
        produced = run_session(ort_session, spec.input_names, inputs)
        for name, reference, value in zip(spec.output_names, expected, produced):
            if tuple(reference.shape) != tuple(value.shape):
                raise ConversionError(
                    f"{path.name}: ONNX Runtime gives {name} of shape {tuple(value.shape)}, PyTorch "
                    f"{tuple(reference.shape)} (inputs of batch {batch_size}, length {length}); nothing is written. "
                    "This is a gap in modeling_selfattn/onnx_export.py: please report it."
                )
            difference = (torch.from_numpy(value) - reference).abs().max().item() if reference.numel() else 0.0
            key = f"{path.name} {name}"
            differences[key] = max(differences.get(key, 0.0), difference)
    return differences


@dataclass
class ExportReport:
    files: list[str]
    differences: dict[str, float]
    fused_operators: dict[str, int] | None = None


def summarized_differences(differences: dict[str, float]) -> dict[str, str]:
    """Per file, its outputs' max abs differences as one line; the cache tensors (present.*), dozens in a deep
    decoder, as one figure."""
    by_file: dict[str, dict[str, float]] = {}
    for key, value in differences.items():
        file_name, output = key.split(" ", 1)
        if output.startswith("present."):
            output = f"present.* ({sum(name.startswith(file_name + ' present.') for name in differences)} tensors)"
        by_file.setdefault(file_name, {})
        by_file[file_name][output] = max(value, by_file[file_name].get(output, 0.0))
    return {
        file_name: ", ".join(f"{output} {value:.3e}" for output, value in outputs.items())
        for file_name, outputs in by_file.items()
    }


def fusion_shape(config) -> dict[str, int]:
    """The head count and width ONNX Runtime's attention fusion takes; 0 and 0 (read them from the graph) for a model
    with pruned heads, whose layers hold fewer heads than the config's count: fusing with that count gave wrong
    outputs (0.76 off on a tiny model); from the graph, attention is left unfused and the outputs stay right."""
    if config.pruned_heads:
        return {"num_heads": 0, "hidden_size": 0}
    return {"num_heads": config.num_attention_heads, "hidden_size": config.hidden_size}


def optimize_encoder_graph(path: Path, config, output: Path) -> dict[str, int]:
    """ONNX Runtime's transformer optimizer (BERT fusions) on `path`, written to `output`; the fused operators."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    # BERT's default hands the fused Attention the mask's row sums (mask_index, one length per row), which assumes
    # right padding: left-padded rows then attended to their padding (3.03 off at real tokens on all-MiniLM-L6-v2).
    # The raw mask keeps every fusion and holds for padding on either side.
    options.use_raw_attention_mask(True)
    optimized = optimize_model(str(path), model_type="bert", optimization_options=options, **fusion_shape(config))
    optimized.save_model_to_file(str(output))
    return {name: count for name, count in optimized.get_fused_operator_statistics().items() if count}


def export_onnx(
    model, folder: str | Path, optimize: bool = False, tolerance: float = 1e-4, overwrite: bool = False
) -> ExportReport:
    """Write the ONNX graphs of `model` into `folder` (which must exist), check each against PyTorch with ONNX Runtime
    on inputs of another batch size and length than traced, and raise ConversionError when an output differs by more
    than `tolerance`. `optimize` adds `model_optimized.onnx`, ONNX Runtime's fused graph (encoder heads only). The
    graphs are of the model in eval mode (no dropout) with eager attention; the model is left as it was. They are
    written into a hidden folder inside `folder` and swapped in only once all have passed the check (`output_folder.swap_files_in`): a
    failed export leaves `folder` as it was, and files it replaces are the old ones all or the new ones all. Files of
    the same names in `folder` are refused (FileExistsError) unless `overwrite`; other files are left alone."""
    check_export_options(optimize, tolerance, overwrite)
    require_onnx_runtime()
    check_exportable(model)
    specs = graph_specs(model)
    if optimize and type(model).__name__ not in ENCODER_HEAD_OUTPUTS:
        raise ConversionError(
            f"--optimize applies ONNX Runtime's BERT fusions to encoder heads; {type(model).__name__} is not one. "
            "Leave out --optimize."
        )
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(
            f"folder={str(folder)!r} is not an existing folder; create it first, or pass the folder to export into."
        )
    names = [spec.file_name for spec in specs] + ([OPTIMIZED_GRAPH] if optimize else [])
    refuse_existing(folder, names, overwrite)
    # Beside the files it replaces, inside `folder`: every move is then a rename on one filesystem, and needs no
    # more than the write permission on `folder` that the export needs anyway.
    staging = unique_sibling(folder / "onnx", "partial")
    staging.mkdir()
    try:
        report = export_checked(model, specs, staging, optimize, tolerance)
        written = sorted(entry.name for entry in staging.iterdir())
        refuse_existing(folder, written, overwrite)  # graphs over 2 GB add files of external data
        swap_files_in(staging, folder, written)
    finally:
        remove(staging)
    return report


def check_export_options(optimize, tolerance, overwrite) -> None:
    """What the CLI's parser refuses, refused here too: a string flag would count as True (overwrite='no' replaced
    the files), and a bad tolerance would surface only after every graph was exported, blaming the graphs."""
    for name, value in (("optimize", optimize), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise TypeError(
                f"export_onnx({name}={value!r}): {name} must be True or False (a string such as 'no' would count as "
                "True)."
            )
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real):
        raise TypeError(
            f"export_onnx(tolerance={tolerance!r}): tolerance must be a number, the largest max abs difference from "
            "PyTorch accepted; pass e.g. tolerance=1e-4."
        )
    # `not >=` also catches nan, with which every comparison is false and the check would pass anything.
    if not tolerance >= 0:
        raise ValueError(
            f"export_onnx(tolerance={tolerance!r}): tolerance must be a number >= 0, the largest max abs difference "
            "from PyTorch accepted; pass e.g. tolerance=1e-4."
        )


def refuse_existing(folder: Path, names: Sequence[str], overwrite: bool) -> None:
    existing = [name for name in names if (folder / name).exists() or (folder / name).is_symlink()]
    if existing and not overwrite:
        raise FileExistsError(
            f"folder={str(folder)!r} holds {', '.join(existing)} already. Pass overwrite=True to replace what the "
            "export writes (only once every graph has been written and checked), or export into another folder."
        )
    # A link would be replaced rather than the file it names; a folder cannot be replaced by a file.
    not_files = [name for name in existing if (folder / name).is_symlink() or not (folder / name).is_file()]
    if not_files:
        raise FileExistsError(
            f"folder={str(folder)!r} holds {', '.join(not_files)}, not as plain files (a folder or symbolic link); "
            "overwrite=True replaces files only. Move them away, or export into another folder."
        )


def export_checked(model, specs: list[GraphSpec], folder: Path, optimize: bool, tolerance: float) -> ExportReport:
    was_training, attention = model.training, model.config._attn_implementation
    model.eval()
    if attention != "eager":
        # The optimizer's fusions match eager attention's operators; SDPA traces to a graph they do not recognise.
        model.set_attn_implementation("eager")
    report = ExportReport([], {})
    try:
        for spec in specs:
            path = export_graph(spec, folder)
            report.files.append(path.name)
            report.differences.update(max_differences(spec, path))
            if optimize:
                optimized = folder / OPTIMIZED_GRAPH
                report.fused_operators = optimize_encoder_graph(path, model.config, optimized)
                report.files.append(optimized.name)
                report.differences.update(max_differences(spec, optimized))
    finally:
        model.train(was_training)
        if attention != "eager":
            model.set_attn_implementation(attention)
    beyond = {name: value for name, value in report.differences.items() if not value <= tolerance}
    if beyond:
        figures = ", ".join(f"{name} {value:.3e}" for name, value in beyond.items())
        raise ConversionError(
            f"The ONNX graphs differ from the PyTorch model beyond --tolerance {tolerance:g} (max abs diff "
            f"{figures}), so nothing is written. Pass a larger --tolerance if this difference is acceptable."
        )
    return report
