#!/usr/bin/env python
"""Export an encoder-only selfattn folder back to transformers' BERT-family layout (BERT or RoBERTa, or the
other families of the conversion tables).

    python conversion/export_bert.py SELFATTN_DIR OUTPUT [--family bert|roberta|xlm-roberta|distilbert|electra]
        [--overwrite]

The family defaults to RoBERTa for a model with RoBERTa's padding-aware positions and BERT otherwise. OUTPUT gets
config.json, model.safetensors and the tokenizer files; it is then loaded with transformers' own class to check
that every tensor fits. Converting a BERT checkpoint and exporting it back gives bit-identical tensors.
Exit status: 0 done, 1 export failed, 2 bad arguments.
"""

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install

import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from modeling_selfattn.conversion import (  # noqa: E402
    ENCODER_FAMILIES,
    TOKENIZER_FILES,
    ConversionError,
    export_checkpoint,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="selfattn model folder (encoder-only)")
    parser.add_argument("output", type=Path, help="transformers checkpoint folder to write")
    parser.add_argument("--family", choices=sorted(ENCODER_FAMILIES), help="layout to write (default: bert or roberta)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()) and not args.overwrite:
        print(f"error: {args.output} exists and is not empty; pass --overwrite to replace it.", file=sys.stderr)
        return 2
    try:
        config, state_dict, report = export_checkpoint(args.source, args.family, progress=True)
    except (ConversionError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    if args.output.exists():
        shutil.rmtree(args.output)
    args.output.mkdir(parents=True)
    config.save_pretrained(args.output)
    tensors = {name: tensor.contiguous() for name, tensor in state_dict.items()}
    save_file(tensors, args.output / "model.safetensors", metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (args.source / name).is_file():
            shutil.copy2(args.source / name, args.output / name)

    architecture = config.architectures[0]
    _, loading_info = getattr(transformers, architecture).from_pretrained(args.output, output_loading_info=True)
    problems = {kind: sorted(keys) for kind, keys in loading_info.items() if kind != "error_msgs" and keys}
    if problems:
        print(f"error: {architecture} does not load the exported tensors cleanly: {problems}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({architecture})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
