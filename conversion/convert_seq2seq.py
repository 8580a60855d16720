#!/usr/bin/env python
"""Convert an encoder-decoder checkpoint (Marian: MarianMTModel or MarianModel; BART: BartForConditionalGeneration
or BartModel) to a selfattn folder ready for `from_pretrained`, `generate()` and the Hub.

    python conversion/convert_seq2seq.py SOURCE OUTPUT [--architecture NAME] [--verify] [--overwrite]

SOURCE is a checkpoint folder (safetensors or PyTorch .bin, sharded or not) or, where a network is, a Hub id.
OUTPUT gets model.safetensors, config.json, the source's generation settings (generation_config.json), the model
code, the tokenizer files and a model card naming the source and, with --verify, the parity figures: max abs
difference of the logits and of the encoder output, and whether generate() gives the source's tokens with greedy
and 4-beam search. The conversion report is printed; any tensor that maps nowhere, is missing or has the wrong
shape stops the conversion.

OUTPUT is written in full beside itself and only then put in place, so a failed run (a conversion problem, a
failed --verify, a write error) leaves an existing OUTPUT as it was and writes nothing; --overwrite replaces an
existing OUTPUT folder that way. OUTPUT may not be SOURCE, contain it or lie inside it, and may not be a file or
a symbolic link (conversion/output_folder.py says why). Exit status: 0 done, 1 conversion failed, parity beyond
--tolerance, tokens that differ or writing failed, 2 bad arguments.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from convert_bert import write_model_card  # noqa: E402
from output_folder import (  # noqa: E402
    OutputFailed,
    OutputRefused,
    check_output,
    check_parity,
    check_tolerance,
    copy_tokenizer_files,
    failed,
    write_output,
)

from modeling_selfattn.conversion import (  # noqa: E402
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
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT if it exists (once the new folder is complete)"
    )
    args = parser.parse_args(argv)
    check_tolerance(parser, args.tolerance)
    return args


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
    """(model, report, verification or None); raises ConversionError, for a failed --verify too."""
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
        raise ConversionError(
            f"--verify runs generate(), which {report.target}, the bare model, cannot; leave out --verify, or convert "
            "a checkpoint with the generation head (MarianMTModel, BartForConditionalGeneration)."
        )
    diffs, mismatches = verify_seq2seq(args.source, model)
    for name, value in diffs.items():
        print(f"max abs diff {name}: {value:.3e}")
    for name, count in mismatches.items():
        print(f"generate() {name}: {count} sequence(s) differ from the source's")
    check_parity(diffs, args.tolerance)
    if any(mismatches.values()):
        raise ConversionError(
            f"--verify: generate() gives other tokens than the source model (sequences that differ: {mismatches}), "
            "so nothing is written. Check that --architecture fits the checkpoint."
        )
    return model, report, (diffs, mismatches)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        target = check_output(args.output, args.source, args.overwrite)
    except OutputRefused as error:
        return failed(error, 2)
    start = time.perf_counter()
    try:
        model, report, verification = convert(args)
        source_folder = resolve_folder(args.source)

        def write(folder: Path) -> None:
            model.save_pretrained(folder)  # generation_config.json holds the source's settings
            copy_tokenizer_files(source_folder, folder)
            seconds = time.perf_counter() - start
            write_model_card(folder, conversion_section(args.source, report, verification, seconds))

        write_output(target, write, source_folder)
    except OutputRefused as error:
        return failed(error, 2)
    except (ConversionError, OutputFailed) as error:
        return failed(error, 1, target)
    except OSError as error:  # reading SOURCE: writing errors arrive as OutputFailed
        return failed(f"Cannot read SOURCE {args.source} ({error}); make its files readable and run again.", 1, target)
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
