#!/usr/bin/env python
"""Convert a BERT-family checkpoint (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA, or a BERT-layout model
such as MiniLM) to a selfattn folder ready for `from_pretrained` and the Hub.

    python conversion/convert_bert.py SOURCE OUTPUT [--architecture NAME] [--verify] [--overwrite]

SOURCE is a checkpoint folder (safetensors or PyTorch .bin, sharded or not) or, where a network is, a Hub id.
OUTPUT gets model.safetensors, config.json, the model code, the tokenizer files and a model card naming the
source and, with --verify, the parity figures. The conversion report is printed; any tensor that maps nowhere,
is missing or has the wrong shape stops the conversion.

OUTPUT is written in full beside itself and only then put in place, so a failed run (a conversion problem,
parity beyond --tolerance, a write error) leaves an existing OUTPUT as it was and writes nothing; --overwrite
replaces an existing OUTPUT folder that way. OUTPUT may not be SOURCE, contain it or lie inside it, and may not
be a file or a symbolic link (conversion/output_folder.py says why). Exit status: 0 done, 1 conversion failed,
parity beyond --tolerance or writing failed, 2 bad arguments.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install
sys.path.insert(0, str(Path(__file__).resolve().parent))

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

from modeling_selfattn.conversion import ConversionError, convert_checkpoint, resolve_folder, verify  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="checkpoint folder, or Hub id where a network is")
    parser.add_argument("output", type=Path, help="selfattn folder to write")
    parser.add_argument(
        "--architecture",
        help="source architecture to convert (default: config.json's), e.g. BertForPreTraining for a checkpoint "
        "that holds both pre-training heads",
    )
    parser.add_argument(
        "--verify", action="store_true", help="run the source transformers model and the converted one on sample text"
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


def conversion_section(source: str, report, diffs: dict | None, seconds: float) -> str:
    lines = [
        "## Conversion",
        "",
        f"Converted from `{source}` (`{report.architecture}`) to `{report.target}` with `conversion/convert_bert.py` "
        f"of the selfattn repository in {seconds:.1f} s: {len(report.mapped)} tensors mapped, "
        f"{len(report.dropped)} dropped (no selfattn counterpart needed).",
        "",
    ]
    if diffs is None:
        lines.append("Parity with the source model was not measured (convert with `--verify` to measure it).")
    else:
        lines += [
            "Parity with the source transformers model on a padded batch of sample sentences (fp32, max abs diff):",
            "",
            "| output | max abs diff |",
            "|---|---|",
        ]
        lines += [f"| {name} | {value:.2e} |" for name, value in diffs.items()]
    return "\n".join(lines) + "\n"


def write_model_card(output: Path, section: str) -> None:
    """Append the conversion section to the card save_pretrained wrote, and keep the card from being regenerated
    (it is now partly written by hand)."""
    readme = output / "README.md"
    card = readme.read_text(encoding="utf-8") if readme.exists() else ""
    card = "\n".join(line for line in card.splitlines() if "selfattn: generated from config.json" not in line)
    readme.write_text(card.rstrip() + "\n\n" + section, encoding="utf-8")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        target = check_output(args.output, args.source, args.overwrite)
    except OutputRefused as error:
        return failed(error, 2)
    start = time.perf_counter()
    try:
        model, report = convert_checkpoint(args.source, args.architecture, progress=True)
        print(report.summary())
        diffs = None
        if args.verify:
            diffs = verify(args.source, model)
            for name, value in diffs.items():
                print(f"max abs diff {name}: {value:.3e}")
            check_parity(diffs, args.tolerance)
        source_folder = resolve_folder(args.source)

        def write(folder: Path) -> None:
            model.save_pretrained(folder)
            copy_tokenizer_files(source_folder, folder)
            seconds = time.perf_counter() - start
            write_model_card(folder, conversion_section(args.source, report, diffs, seconds))

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
