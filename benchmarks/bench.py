"""selfattn against transformers' own models on identical weights, side by side in one process.

    python benchmarks/bench.py                       # every workload, CPU, results to bench_results.json
    python benchmarks/bench.py --workloads greedy_b1,beam4_b1 --repeats 9
    python benchmarks/bench.py --device cuda --dtype bfloat16

Each workload builds a reference model (BertModel, BertForMaskedLM or MarianMTModel, SDPA attention) and the
selfattn model with the same weights, checks that they agree (hidden states, logits, or the generated tokens),
warms both up, then times them in alternating order (A B, B A, ...) so that drift in machine load falls on both
sides alike. It prints the median time per call, throughput, the ratio to the reference and model FLOPs
utilisation (MFU) against GEMM peaks measured here, and writes everything to a JSON file.

Variants timed against the reference:
  selfattn         the model as loaded (automatic fast paths only: unpadded encoding, fast decoding).
  selfattn-onednn  the same after `enable_onednn_inference(model)` (opt-in; CPU inference in float32).
  selfattn-compiled  generation only: after `enable_compiled_decoding(model)` (opt-in; static cache,
                   torch.compile'd decoding steps; compiled during warm-up, which is not timed).
  selfattn-onednn-compiled  generation only: both opt-ins (oneDNN linears inside the compiled steps).
Both sides run under the same global torch settings, which this script never changes.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's package (not another install), and pairs.py
from pairs import (  # noqa: E402
    BERT_BASE_SHAPE,
    EOS_ID,
    MINILM_SHAPE,
    PAD_ID,
    bert_pair,
    check_marian_pair,
    marian_pair,
    minilm_folder,
    padded_batch,
    skewed_lengths,
)
from modeling_selfattn.fast_paths import enable_compiled_decoding, enable_onednn_inference  # noqa: E402

SOURCE_LENGTH, NEW_TOKENS = 64, 64


# ---------------------------------------------------------------------------------------------------------------
# Model FLOPs (multiply-adds count 2; embeddings, norms, softmax and activations are left out)


def encoder_flops(lengths: list[int], hidden: int, inner: int, layers: int) -> float:
    per_token = 2 * (4 * hidden * hidden + 2 * hidden * inner)
    return layers * sum(n * per_token + 4 * n * n * hidden for n in lengths)


def mlm_step_flops(lengths: list[int], hidden: int, inner: int, layers: int, vocab: int) -> float:
    forward = encoder_flops(lengths, hidden, inner, layers) + sum(lengths) * 2 * (hidden * hidden + hidden * vocab)
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
    parity: dict = field(default_factory=dict)


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
    """selfattn variants: the plain model and, on request, copies in opt-in modes (oneDNN CPU inference;
    compiled decoding for models that generate; both)."""
    import copy

    models = {}
    for variant in variants:
        if variant == "selfattn":
            models[variant] = ours
        elif variant == "selfattn-onednn":
            models[variant] = enable_onednn_inference(copy.deepcopy(ours))
        elif variant == "selfattn-compiled" and ours.can_generate():
            models[variant] = enable_compiled_decoding(copy.deepcopy(ours))
        elif variant == "selfattn-onednn-compiled" and ours.can_generate():
            models[variant] = enable_compiled_decoding(enable_onednn_inference(copy.deepcopy(ours)))
    return models


def real_token_diff(expected: torch.Tensor, actual: torch.Tensor, attention_mask: torch.Tensor) -> float:
    real = attention_mask.bool()
    return (expected[real].float() - actual[real].float()).abs().max().item()


def encoder_workload(name, description, shape, lengths, args, variants) -> Workload:
    reference, ours = bert_pair("BertModel", shape)
    reference, ours = reference.to(args.device, args.dtype), ours.to(args.device, args.dtype)
    batch = padded_batch(lengths, reference.config.vocab_size)
    inputs = {name: tensor.to(args.device) for name, tensor in batch.items()}
    config = reference.config
    flops = encoder_flops(lengths, config.hidden_size, config.intermediate_size, config.num_hidden_layers)
    runners = {"reference": inference(reference, inputs)}
    expected = runners["reference"]().last_hidden_state
    parity = {}
    for variant, model in ours_variants(ours, variants).items():
        runners[variant] = inference(model, inputs)
        parity[variant] = real_token_diff(expected, runners[variant]().last_hidden_state, inputs["attention_mask"])
    return Workload(name, description, sum(lengths), flops, runners, {"max_abs_diff_real_tokens": parity})


def mlm_training_workload(args, variants) -> Workload:
    shape = MINILM_SHAPE if args.random_minilm or minilm_folder() is None else None
    reference, ours = bert_pair("BertForMaskedLM", shape)
    reference, ours = reference.to(args.device, args.dtype), ours.to(args.device, args.dtype)
    batch, length = 16, 128
    input_ids = random_ids((batch, length), reference.config.vocab_size, 3, args.device)
    masked = torch.rand((batch, length), generator=torch.Generator().manual_seed(4)).to(args.device) < 0.15
    inputs = {
        "input_ids": input_ids.masked_fill(masked, 103),
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.masked_fill(~masked, -100),
    }
    with torch.no_grad():
        parity = {"loss_diff_eval": abs(reference(**inputs).loss.item() - ours(**inputs).loss.item())}

    def training_step(model):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def run():
            loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return run

    config = reference.config
    flops = mlm_step_flops(
        [length] * batch, config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    )
    runners = {"reference": training_step(reference), "selfattn": training_step(ours)}
    return Workload(
        "mlm_train_minilm_16x128", "MLM training step (forward, backward, AdamW), MiniLM, 16x128", batch * length,
        flops, runners, parity,
    )


_marian_cache = {}


def generation_workload(name, batch, beams, args, variants) -> Workload:
    if "pair" not in _marian_cache:
        reference, ours = marian_pair()
        _marian_cache["pair"] = (reference.to(args.device, args.dtype), ours.to(args.device, args.dtype))
        _marian_cache["forward_diff"] = check_marian_pair(*_marian_cache["pair"])
    reference, ours = _marian_cache["pair"]
    config = reference.config
    source = random_ids((batch, SOURCE_LENGTH), config.vocab_size, 5, args.device)
    generation_config = GenerationConfig(
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams, do_sample=False,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, decoder_start_token_id=PAD_ID,
    )

    def generate(model):
        def run():
            return model.generate(
                input_ids=source, attention_mask=torch.ones_like(source), generation_config=generation_config
            )

        return run

    runners = {"reference": generate(reference)}
    expected = runners["reference"]()
    parity = {"forward_logits_max_abs_diff": _marian_cache["forward_diff"]}
    for variant, model in ours_variants(ours, variants).items():
        runners[variant] = generate(model)
        parity[f"{variant}_tokens_identical"] = bool(torch.equal(expected, runners[variant]()))
    flops = decode_flops(batch, beams, config.d_model, config.decoder_ffn_dim, config.decoder_layers, config.vocab_size)
    description = f"{'greedy' if beams == 1 else f'beam search ({beams} beams)'}, batch {batch}, Transformer-base"
    return Workload(name, description, batch * NEW_TOKENS, flops, runners, parity)


WORKLOADS = {
    "encoder_minilm_32x128": lambda args, variants: encoder_workload(
        "encoder_minilm_32x128", "MiniLM encoder, full batch 32x128",
        MINILM_SHAPE if args.random_minilm or minilm_folder() is None else None, [128] * 32, args, variants,
    ),
    "encoder_bert_base_8x512": lambda args, variants: encoder_workload(
        "encoder_bert_base_8x512", "bert-base encoder (random weights), full batch 8x512", BERT_BASE_SHAPE,
        [512] * 8, args, variants,
    ),
    "encoder_padded_64": lambda args, variants: encoder_workload(
        "encoder_padded_64", "MiniLM encoder, 64 sentences of skewed lengths (median 40, max 512), real tokens",
        MINILM_SHAPE if args.random_minilm or minilm_folder() is None else None, skewed_lengths(), args, variants,
    ),
    "mlm_train_minilm_16x128": lambda args, variants: mlm_training_workload(args, variants),
    "greedy_b1": lambda args, variants: generation_workload("greedy_b1", 1, 1, args, variants),
    "greedy_b16": lambda args, variants: generation_workload("greedy_b16", 16, 1, args, variants),
    "beam4_b1": lambda args, variants: generation_workload("beam4_b1", 1, 4, args, variants),
}


# ---------------------------------------------------------------------------------------------------------------
# Timing


def gemm_peaks(device: str, dtype: torch.dtype) -> dict[str, float]:
    """GFLOP/s of a large GEMM (4096 x 1024 x 4096) through each route the models can take."""
    m, k, n = 4096, 1024, 4096
    x, w = torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
    routes = {"F.linear": lambda: torch.nn.functional.linear(x, w)}
    if device == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
        routes["onednn_prepacked"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    peaks = {}
    for route, run in routes.items():
        run()
        times = []
        for _ in range(5):
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times.append(time.perf_counter() - start)
        peaks[route] = 2 * m * k * n / statistics.median(times) / 1e9
    return peaks


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


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument(
        "--variants", default="selfattn,selfattn-onednn,selfattn-compiled,selfattn-onednn-compiled",
        help="selfattn, selfattn-onednn, selfattn-compiled, selfattn-onednn-compiled",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--random-minilm", action="store_true", help="random MiniLM-shaped weights, not the checkpoint")
    parser.add_argument("--output", default="bench_results.json")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    variants = [variant for variant in args.variants.split(",") if variant]
    if args.device != "cpu" or args.dtype != torch.float32:
        variants = [variant for variant in variants if "onednn" not in variant]  # CPU float32 only
    transformers.logging.set_verbosity_error()

    peaks = gemm_peaks(args.device, args.dtype)
    peak = max(peaks.values())
    results = {
        "environment": {
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "dtype": str(args.dtype).removeprefix("torch."), "load_average_start": load_average(),
        },
        "gemm_peak_gflops": peaks,
        "workloads": {},
    }
    print(f"GEMM peaks (GFLOP/s): {', '.join(f'{route} {value:.0f}' for route, value in peaks.items())}")
    header = f"{'workload':26} {'variant':24} {'median s':>9} {'tok/s':>9} {'ratio':>6} {'MFU':>6}"
    rows = [header, "-" * len(header)]
    for name in args.workloads.split(","):
        workload = WORKLOADS[name](args, variants)
        times = time_alternating(workload.runners, args.repeats, args.warmup, args.device)
        reference_median = statistics.median(times["reference"])
        entry = {
            "description": workload.description, "tokens_per_call": workload.tokens, "flops_per_call": workload.flops,
            "parity": workload.parity, "load_average": load_average(), "variants": {},
        }
        for variant, samples in times.items():
            median = statistics.median(samples)
            entry["variants"][variant] = {
                "times_s": samples, "median_s": median, "tokens_per_s": workload.tokens / median,
                "ratio_to_reference": reference_median / median, "mfu": workload.flops / median / (peak * 1e9),
            }
            rows.append(
                f"{name:26} {variant:24} {median:9.3f} {workload.tokens / median:9.0f} "
                f"{reference_median / median:6.2f} {workload.flops / median / (peak * 1e9):6.1%}"
            )
            print(rows[-1], flush=True)
        print(f"{'':26} parity: {workload.parity}", flush=True)
        results["workloads"][name] = entry
        results["environment"]["load_average_end"] = load_average()
        Path(args.output).write_text(json.dumps(results, indent=2))  # after each workload: partial runs count too
    print("\n".join(["", *rows, "", f"MFU against the best measured GEMM peak, {peak:.0f} GFLOP/s; load average "
                     f"{results['environment']['load_average_start']} -> {results['environment']['load_average_end']}; "
                     f"results in {args.output}"]))


if __name__ == "__main__":
    main()
