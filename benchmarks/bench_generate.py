#!/usr/bin/env python
"""Greedy decoding speed on CPU: selfattn's encoder-decoder against transformers' MarianMTModel on identical
weights (a random Transformer-base: 6+6 layers, width 512, 8 heads, FFN 2048, vocabulary 32000), converted with
modeling_selfattn/conversion.py. Sources of 64 tokens, exactly 64 new tokens (min_new_tokens = max_new_tokens),
batch 1 and 16. Prints the median time of --repeats runs (the two models take turns), tokens per second and
the ratio ours / Marian.

    python benchmarks/bench_generate.py [--repeats 5] [--batch-sizes 1 16]

Not a test: figures depend on the machine and on what else it runs.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import MarianConfig, MarianMTModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install

from modeling_selfattn.conversion import convert_checkpoint  # noqa: E402

TRANSFORMER_BASE = dict(
    vocab_size=32000,
    d_model=512,
    encoder_layers=6,
    decoder_layers=6,
    encoder_attention_heads=8,
    decoder_attention_heads=8,
    encoder_ffn_dim=2048,
    decoder_ffn_dim=2048,
    activation_function="relu",
    max_position_embeddings=512,
    scale_embedding=True,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    forced_eos_token_id=None,
)
SOURCE_LENGTH = 64
NEW_TOKENS = 64


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model and batch size (default 5)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    return parser.parse_args(argv)


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    marian = MarianMTModel(MarianConfig(**TRANSFORMER_BASE)).eval()
    with tempfile.TemporaryDirectory() as folder:
        marian.save_pretrained(folder)
        ours, _ = convert_checkpoint(folder)
    return marian, ours.eval()


def time_greedy(named_models: dict, input_ids: torch.Tensor, repeats: int) -> dict[str, tuple[float, torch.Tensor]]:
    """name -> (median seconds of one generate() call, the tokens). The models take turns, in alternating order,
    so that a change in the machine's load affects both alike; one untimed warm-up call each first."""
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=1, do_sample=False)
    seconds = {name: [] for name in named_models}
    with torch.inference_mode():
        tokens = {name: model.generate(input_ids, **options) for name, model in named_models.items()}
        for repeat in range(repeats):
            order = list(named_models) if repeat % 2 == 0 else list(reversed(named_models))
            for name in order:
                start = time.perf_counter()
                named_models[name].generate(input_ids, **options)
                seconds[name].append(time.perf_counter() - start)
    return {name: (statistics.median(seconds[name]), tokens[name]) for name in named_models}


def main(argv=None) -> int:
    args = parse_args(argv)
    marian, ours = models()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {NEW_TOKENS} new tokens per sequence")
    print(f"{'batch':>5} {'model':>8} {'median s':>9} {'tokens/s':>9} {'ours/Marian':>12}")
    for batch_size in args.batch_sizes:
        input_ids = torch.randint(2, TRANSFORMER_BASE["vocab_size"], (batch_size, SOURCE_LENGTH),
                                  generator=torch.Generator().manual_seed(batch_size))
        results = time_greedy({"marian": marian, "selfattn": ours}, input_ids, args.repeats)
        same = torch.equal(results["marian"][1], results["selfattn"][1])
        speeds = {name: batch_size * NEW_TOKENS / seconds for name, (seconds, _) in results.items()}
        for name, (seconds, _) in results.items():
            ratio = f"{speeds['selfattn'] / speeds['marian']:.2f}" if name == "selfattn" else ""
            print(f"{batch_size:>5} {name:>8} {seconds:>9.3f} {speeds[name]:>9.1f} {ratio:>12}")
        print(f"      same tokens: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
