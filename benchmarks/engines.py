"""Reference inference engines for the benchmarks, run on the weights of transformers' reference model.

    ort        ONNX Runtime, float32: transformers' BertModel exported by torch's TorchScript exporter
               (`dynamo=False`) from eager attention, dynamic batch and sequence axes, then fused by ORT's
               transformer optimizer (`optimize_model`, model type bert). Eager attention is traced because the
               optimizer's Attention and EmbedLayerNormalization fusions recognise its graph and not the one
               traced from SDPA (SkipLayerNormalization and BiasGelu fire on both).
    ort-int8   the optimized model through `quantize_dynamic(per_channel=True)`: int8 weights (QInt8, one scale
               per output channel), activations quantized at run time.
    ct2        CTranslate2, float32: `TransformersConverter` on the saved reference (BertModel -> Encoder,
               MarianMTModel -> Translator).
    ct2-int8   the same converted model loaded with compute type int8_float32 (CTranslate2 quantizes the weights
               on load: int8 matrix products, float32 elsewhere).

The engines are optional (`pip install -e '.[bench]'`): `unavailable()` says why a variant cannot run, and the
benchmark skips it. ONNX Runtime sessions keep its default threads (one per physical core, as torch);
CTranslate2 gets torch's thread count, since its own default is 4 threads whatever the machine.

`import ctranslate2` must come before `import torch` in the process: imported after it, it binds torch's OpenMP
runtime and torch's small ops get 20-30% slower. bench.py imports it first; so does this module.
"""

import copy
import importlib.util
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

try:
    import ctranslate2  # before torch: see the module docstring
except ImportError:
    ctranslate2 = None
import torch
import transformers

ENCODER_ENGINES = ("ort", "ort-int8", "ct2", "ct2-int8")
GENERATION_ENGINES = ("ct2", "ct2-int8")
PACKAGES = {"ort": ("onnx", "onnxruntime"), "ct2": ("ctranslate2",)}
CT2_COMPUTE_TYPES = {"ct2": "float32", "ct2-int8": "int8_float32"}


def engine_of(variant: str) -> str:
    return variant.split("-")[0]


def cpu_float32_only(device: str, dtype: torch.dtype) -> str | None:
    """Why a variant that runs on CPU in float32 only (the engines; bench.py's CPU_FLOAT32_VARIANTS) cannot run on
    `device` in `dtype`, or None: bench.py's ruled_out() and unavailable() here both say it with this."""
    if device != "cpu" or dtype != torch.float32:
        return "runs on CPU in float32 only"
    return None


def unavailable(variant: str, device: str, dtype: torch.dtype) -> str | None:
    """Why `variant` cannot run here, or None."""
    settings = cpu_float32_only(device, dtype)
    if settings is not None:
        return f"it {settings} (the reference's settings here differ)"
    missing = [name for name in PACKAGES[engine_of(variant)] if importlib.util.find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install -e '.[bench]')"
    return None


def id_tokenizer(vocab_size: int, specials: dict[int, str], **roles: str) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer whose token for id i is `specials[i]`, else `t{i}`. The converters read the
    vocabulary and the special tokens from a tokenizer in the model folder; the benchmarks feed ids or these
    strings, never text."""
    from tokenizers import Tokenizer, models

    if any(not 0 <= i < vocab_size for i in specials):
        raise ValueError(f"special token ids {sorted(specials)} must lie in the vocabulary (0 to {vocab_size - 1})")
    vocabulary = {specials.get(i, f"t{i}"): i for i in range(vocab_size)}
    if len(vocabulary) != vocab_size:
        raise ValueError(f"special tokens {specials} clash with the t<id> names of ordinary tokens")
    word_level = Tokenizer(models.WordLevel(vocabulary, unk_token=roles.get("unk_token")))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, **roles)


@dataclass
class EncoderEngine:
    run: Callable[[], object]  # one timed call on the workload's batch
    last_hidden_state: Callable[[object], torch.Tensor]  # a call's result -> (batch, length, hidden), float32


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime


class _LastHiddenState(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


def onnx_bert_sessions(reference: transformers.BertModel, variants: list[str]) -> tuple[dict, dict]:
    """ONNX Runtime sessions of `reference` ("ort", "ort-int8", as requested) and what the optimizer fused."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    config = reference.config
    # An eager copy: the reference keeps SDPA for its own timing. The wrapper is put in eval mode because the
    # exporter restores the given module's mode afterwards, recursively (a new module is in training mode).
    eager = copy.deepcopy(reference).eval()
    eager.set_attn_implementation("eager")
    wrapper = _LastHiddenState(eager).eval()
    # A padded row in the example, so that the traced graph keeps the mask (an all-ones mask may be short-cut).
    input_ids = torch.arange(16).reshape(2, 8) % config.vocab_size
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    names = ["input_ids", "attention_mask", "token_type_ids"]
    sessions = {}
    with tempfile.TemporaryDirectory() as folder:
        exported, optimized, quantized = (Path(folder) / name for name in ("model.onnx", "opt.onnx", "int8.onnx"))
        with torch.no_grad():
            torch.onnx.export(
                wrapper, (input_ids, attention_mask, torch.zeros_like(input_ids)), str(exported), dynamo=False,
                opset_version=17, input_names=names, output_names=["last_hidden_state"],
                dynamic_axes={name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]},
            )
        fused = optimizer.optimize_model(
            str(exported), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
        )
        fusions = {name: count for name, count in fused.get_fused_operator_statistics().items() if count}
        fused.save_model_to_file(str(optimized))
        if "ort" in variants:
            sessions["ort"] = onnxruntime.InferenceSession(str(optimized), providers=["CPUExecutionProvider"])
        if "ort-int8" in variants:
            # ONNX shape inference gives no type for the outputs of ORT's fused operators (contrib domain); every
            # float tensor of this model is float32.
            quantize_dynamic(
                optimized, quantized, per_channel=True, weight_type=QuantType.QInt8,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
            sessions["ort-int8"] = onnxruntime.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
    return sessions, {"ort_fusions": fusions}


def ort_encoder(session, batch: dict[str, torch.Tensor]) -> EncoderEngine:
    feeds = {
        "input_ids": batch["input_ids"].cpu().numpy(),
        "attention_mask": batch["attention_mask"].cpu().numpy(),
        "token_type_ids": batch.get("token_type_ids", torch.zeros_like(batch["input_ids"])).cpu().numpy(),
    }
    return EncoderEngine(lambda: session.run(None, feeds)[0], torch.from_numpy)


# ---------------------------------------------------------------------------------------------------------------
# CTranslate2


def _ct2_convert(reference, tokenizer, folder: Path, **config_fields) -> Path:
    """Save `reference` and `tokenizer` (and `config_fields` into config.json), then convert."""
    reference.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    if config_fields:
        config_file = folder / "hf" / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **config_fields}, indent=2))
    converter = ctranslate2.converters.TransformersConverter(str(folder / "hf"))
    return Path(converter.convert(str(folder / "ct2")))


def ct2_bert_encoders(reference: transformers.BertModel, variants: list[str]) -> dict:
    """CTranslate2 encoders of `reference` ("ct2", "ct2-int8", as requested)."""
    import ctranslate2.converters  # noqa: F401  (the submodule; ctranslate2 itself is imported above)

    config = reference.config
    # The converter needs an unknown token (the benchmarks feed ids): BERT's [UNK] id where the vocabulary has it.
    unk = 100 if config.vocab_size > 100 else config.vocab_size - 1
    tokenizer = id_tokenizer(config.vocab_size, {0: "[PAD]", unk: "[UNK]"}, unk_token="[UNK]", pad_token="[PAD]")
    with tempfile.TemporaryDirectory() as folder:
        # CTranslate2's BERT loader asserts the field, which transformers 5 no longer writes (absolute positions
        # are the only kind it has).
        path = _ct2_convert(reference, tokenizer, Path(folder), position_embedding_type="absolute")
        return {
            variant: ctranslate2.Encoder(
                str(path), device="cpu", compute_type=CT2_COMPUTE_TYPES[variant], intra_threads=torch.get_num_threads()
            )
            for variant in variants
            if variant in CT2_COMPUTE_TYPES
        }


def ct2_encoder(encoder, batch: dict[str, torch.Tensor]) -> EncoderEngine:
    import numpy

    lengths = batch["attention_mask"].sum(dim=1).tolist()
    if not torch.equal(batch["attention_mask"].cpu(), _right_padded_mask(lengths, batch["attention_mask"].shape[1])):
        raise ValueError("ct2_encoder needs a right-padded batch (real tokens first in every row)")
    token_ids = [row[:length].tolist() for row, length in zip(batch["input_ids"].cpu(), lengths)]
    return EncoderEngine(
        lambda: encoder.forward_batch(token_ids),
        lambda output: torch.from_numpy(numpy.array(output.last_hidden_state)),
    )


def _right_padded_mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()


def ct2_marian_translators(reference: transformers.MarianMTModel, variants: list[str]) -> tuple[dict, list[str]]:
    """CTranslate2 translators of `reference` ("ct2", "ct2-int8", as requested) and the vocabulary (token of each
    id) that translate_batch takes and returns.

    CTranslate2 follows Marian: the decoder starts from a zero embedding rather than from a start token, and the
    last id of the vocabulary, <pad>, is dropped (never generated). MarianMTModel matches it when pad is the last
    id, its embedding row is zero and it is the decoder start token, and generation suppresses it."""
    import ctranslate2.converters  # noqa: F401

    config = reference.config
    pad, eos = config.pad_token_id, config.eos_token_id
    if pad != config.vocab_size - 1 or config.decoder_start_token_id != pad:
        raise ValueError(
            f"CTranslate2's Marian conversion needs pad as the last id and as decoder start token; this model has "
            f"pad_token_id={pad}, decoder_start_token_id={config.decoder_start_token_id}, "
            f"vocab_size={config.vocab_size}"
        )
    if reference.get_input_embeddings().weight[pad].any():
        raise ValueError(f"CTranslate2 starts Marian decoders from a zero embedding; row {pad} (pad) is not zero")
    unk = next(i for i in range(config.vocab_size) if i not in (pad, eos))
    tokenizer = id_tokenizer(
        config.vocab_size, {eos: "</s>", unk: "<unk>", pad: "<pad>"}, eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )
    with tempfile.TemporaryDirectory() as folder:
        path = _ct2_convert(reference, tokenizer, Path(folder))
        translators = {
            variant: ctranslate2.Translator(
                str(path), device="cpu", compute_type=CT2_COMPUTE_TYPES[variant], intra_threads=torch.get_num_threads()
            )
            for variant in variants
            if variant in CT2_COMPUTE_TYPES
        }
    return translators, tokenizer.convert_ids_to_tokens(list(range(config.vocab_size)))


def ct2_generate(translator, vocabulary: list[str], source: torch.Tensor, beams: int, new_tokens: int):
    """(one timed call, result -> generated ids per sentence): exactly `new_tokens` tokens, like generate() with
    min_new_tokens = max_new_tokens; length penalty 1 as transformers' default (equal lengths make it moot)."""
    source_tokens = [[vocabulary[i] for i in row] for row in source.cpu().tolist()]
    index = {token: i for i, token in enumerate(vocabulary)}

    def run():
        return translator.translate_batch(
            source_tokens, beam_size=beams, num_hypotheses=1, length_penalty=1.0,
            max_decoding_length=new_tokens, min_decoding_length=new_tokens,
        )

    return run, lambda results: [[index[token] for token in result.hypotheses[0]] for result in results]
