#!/usr/bin/env python
"""`selfattn-convert export` at the path the README gave before the console script existed: a selfattn folder back
to a transformers layout (the BERT family for an encoder; Marian or BART for an encoder-decoder).

    python conversion/export_bert.py SELFATTN_DIR OUTPUT [--family NAME] [--overwrite]

--help lists the arguments; modeling_selfattn/convert_cli.py does the work.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install

from modeling_selfattn import convert_cli  # noqa: E402


def main(argv=None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    return convert_cli.main(["export", *arguments], script_name=Path(__file__).name)


if __name__ == "__main__":
    sys.exit(main())
