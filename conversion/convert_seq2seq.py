#!/usr/bin/env python
"""Convert an encoder-decoder checkpoint (Marian: MarianMTModel or MarianModel; BART: BartForConditionalGeneration
or BartModel) to a selfattn folder ready for `from_pretrained`, `generate()` and the Hub.

    python conversion/convert_seq2seq.py SOURCE OUTPUT [--architecture NAME] [--verify] [--overwrite]

SOURCE is a checkpoint folder (safetensors or PyTorch .bin, sharded or not) or, where a network is, a Hub id.
OUTPUT gets model.safetensors, config.json, the source's generation settings (generation_config.json), the model
code, the tokenizer files and a model card naming the source and, with --verify, the parity figures: max abs
difference of the logits and of the encoder output, and whether generate() gives the source's tokens with greedy
and 4-beam search. The conversion report is printed; any tensor that maps nowhere, is missing or has the wrong
shape stops the conversion. Exit status: 0 done, 1 conversion failed, parity beyond --tolerance or tokens that
differ, 2 bad arguments.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from convert_bert import write_model_card  # noqa: E402

from modeling_selfattn.conversion import (  # noqa: E402
    TOKENIZER_FILES,
    ConversionError,
    convert_checkpoint,
    read_config,
    resolve_folder,
    verify_seq2seq,
)

SEQ2SEQ_MODEL_TYPES = ("marian", "bart")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="checkpoint folder, or Hub id where a network is")
    parser.add_argument("output", type=Path, help="selfattn folder to write")
    parser.add_argument(
        "--architecture", help="source architecture to convert (default: config.json's), e.g. MarianModel"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run the source transformers model and the converted one on sample text: logits and generate()",
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest max abs difference --verify accepts (default 1e-4)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return parser.parse_args(argv)


def conversion_section(source: str, report, verification: tuple | None, seconds: float) -> str:
    lines = [
        "## Conversion",
        "",
        f"Converted from `{source}` (`{report.architecture}`) to `{report.target}` with "
        f"`conversion/convert_seq2seq.py` of the selfattn repository in {seconds:.1f} s: {len(report.mapped)} "
        f"tensors mapped, {len(report.dropped)} dropped (no selfattn counterpart needed). The source's generation "
        "settings are kept in generation_config.json.",
        "",
    ]
    if verification is None:
        lines.append("Parity with the source model was not measured (convert with `--verify` to measure it).")
        return "\n".join(lines) + "\n"
    diffs, mismatches = verification
    lines += [
        "Parity with the source transformers model on a padded batch of sample sentences (fp32):",
        "",
        "| check | result |",
        "|---|---|",
    ]
    lines += [f"| {name} max abs diff | {value:.2e} |" for name, value in diffs.items()]
    lines += [f"| generate(), {name}: sequences that differ | {count} |" for name, count in mismatches.items()]
    return "\n".join(lines) + "\n"


def convert(args: argparse.Namespace):
    """(model, report, verification or None); raises ConversionError."""
    model_type = read_config(resolve_folder(args.source)).get("model_type")
    if model_type not in SEQ2SEQ_MODEL_TYPES:
        raise ConversionError(
            f"{args.source} holds a {model_type!r} checkpoint; this script converts {list(SEQ2SEQ_MODEL_TYPES)} "
            "encoder-decoders (conversion/convert_bert.py converts BERT-family encoders)."
        )
    model, report = convert_checkpoint(args.source, args.architecture, progress=True)
    print(report.summary())
    if not args.verify:
        return model, report, None
    if not model.can_generate():
        raise ConversionError(f"--verify runs generate(); {report.target} is the bare model, which cannot.")
    diffs, mismatches = verify_seq2seq(args.source, model)
    for name, value in diffs.items():
        print(f"max abs diff {name}: {value:.3e}")
    for name, count in mismatches.items():
        print(f"generate() {name}: {count} sequence(s) differ from the source's")
    return model, report, (diffs, mismatches)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()) and not args.overwrite:
        print(f"error: {args.output} exists and is not empty; pass --overwrite to replace it.", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        model, report, verification = convert(args)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.output.exists():
        shutil.rmtree(args.output)
    model.save_pretrained(args.output)  # generation_config.json holds the source's settings
    source_folder = resolve_folder(args.source)
    for name in TOKENIZER_FILES:
        if (source_folder / name).is_file():
            shutil.copy2(source_folder / name, args.output / name)
    seconds = time.perf_counter() - start
    write_model_card(args.output, conversion_section(args.source, report, verification, seconds))
    print(f"wrote {args.output} in {seconds:.1f} s")
    if verification is not None:
        diffs, mismatches = verification
        if max(diffs.values()) > args.tolerance:
            print(f"error: parity {max(diffs.values()):.3e} exceeds --tolerance {args.tolerance:g}", file=sys.stderr)
            return 1
        if any(mismatches.values()):
            print(f"error: generate() gives other tokens than the source: {mismatches}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
