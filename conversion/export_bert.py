#!/usr/bin/env python
"""Export an encoder-only selfattn folder back to transformers' BERT-family layout (BERT or RoBERTa, or the
other families of the conversion tables).

    python conversion/export_bert.py SELFATTN_DIR OUTPUT [--family bert|roberta|xlm-roberta|distilbert|electra]
        [--overwrite]

The family defaults to RoBERTa for a model with RoBERTa's padding-aware positions and BERT otherwise. OUTPUT gets
config.json, model.safetensors and the tokenizer files; it is then loaded with transformers' own class to check
that every tensor fits. Converting a BERT checkpoint and exporting it back gives bit-identical tensors.

OUTPUT is written in full beside itself, loaded, and only then put in place, so a failed run leaves an existing
OUTPUT as it was and writes nothing; --overwrite replaces an existing OUTPUT folder that way. OUTPUT may not be
SELFATTN_DIR, contain it or lie inside it, and may not be a file or a symbolic link (conversion/output_folder.py
says why). Exit status: 0 done, 1 export or writing failed, 2 bad arguments.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install
sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformers  # noqa: E402
from output_folder import (  # noqa: E402
    OutputFailed,
    OutputRefused,
    check_output,
    copy_tokenizer_files,
    failed,
    write_output,
)
from safetensors.torch import save_file  # noqa: E402

from modeling_selfattn.conversion import ENCODER_FAMILIES, ConversionError, export_checkpoint  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="selfattn model folder (encoder-only)")
    parser.add_argument("output", type=Path, help="transformers checkpoint folder to write")
    parser.add_argument("--family", choices=sorted(ENCODER_FAMILIES), help="layout to write (default: bert or roberta)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT if it exists (once the new folder is complete)"
    )
    return parser.parse_args(argv)


def check_loads(config, folder: Path) -> None:
    """Load `folder` with transformers' own class; raise ConversionError unless every tensor fits."""
    architecture = config.architectures[0]
    _, loading_info = getattr(transformers, architecture).from_pretrained(folder, output_loading_info=True)
    problems = {kind: sorted(keys) for kind, keys in loading_info.items() if kind != "error_msgs" and keys}
    if problems:
        raise ConversionError(
            f"{architecture} does not load the exported tensors cleanly: {problems}; nothing is written. This is "
            "a gap in the conversion tables of modeling_selfattn/conversion.py: please report it."
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        target = check_output(args.output, args.source, args.overwrite)
    except OutputRefused as error:
        return failed(error, 2)
    try:
        config, state_dict, report = export_checkpoint(args.source, args.family, progress=True)
        print(report.summary())

        def write(folder: Path) -> None:
            config.save_pretrained(folder)
            tensors = {name: tensor.contiguous() for name, tensor in state_dict.items()}
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
            copy_tokenizer_files(args.source, folder)
            check_loads(config, folder)

        write_output(target, write, args.source)
    except OutputRefused as error:
        return failed(error, 2)
    except (ConversionError, OutputFailed) as error:
        return failed(error, 1, target)
    except OSError as error:  # reading SOURCE: writing errors arrive as OutputFailed
        return failed(
            f"Cannot read SELFATTN_DIR {args.source} ({error}); make its files readable and run again.", 1, target
        )
    print(f"wrote {args.output} ({config.architectures[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
