#!/usr/bin/env python
"""`selfattn-convert seq2seq` at the path the README gave before the console script existed: a Marian or BART
encoder-decoder checkpoint to a selfattn folder.

    python conversion/convert_seq2seq.py SOURCE OUTPUT [--architecture NAME] [--verify] [--overwrite]

--help lists the arguments; modeling_selfattn/convert_cli.py does the work.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install

from modeling_selfattn import convert_cli  # noqa: E402


def main(argv=None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    return convert_cli.main(["seq2seq", *arguments], script_name=Path(__file__).name)


if __name__ == "__main__":
    sys.exit(main())
