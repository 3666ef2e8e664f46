#!/usr/bin/env python
"""Tokenize JSONL into Megatron's indexed format, as Megatron-LM's tools/preprocess_data.py does.

  python tools/preprocess_data.py --input docs.jsonl --output-prefix data/docs --tokenizer tokenizer.json \\
      [--json-keys text] [--workers 4]

writes data/docs_text_document.bin / .idx (EOD appended to every document) for
`megajoy pretrain --data-path data/docs_text_document --tokenizer tokenizer.json`. A malformed line is
reported with its number and counted; `--strict` stops at the first one instead, leaving no output.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megajoy.data.indexed import Unreadable, write_indexed_dataset  # noqa: E402
from megajoy.data.tokenizer import TokenizerInfo  # noqa: E402


def numbered_lines(path: str):
    """(line number, text) for each line; undecodable bytes become a line the parser will reject."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield number, Unreadable(f"invalid UTF-8 at byte {e.start}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a JSONL file, one document per line")
    parser.add_argument("--output-prefix", required=True, help="output path without the _KEY_document suffix")
    parser.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                        help="a Hugging Face tokenizer.json")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="fields holding the text (default: text)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--append-eod", dest="append_eod", action="store_true", default=True,
                        help="append the end-of-document token to every document (default)")
    parser.add_argument("--no-append-eod", dest="append_eod", action="store_false")
    parser.add_argument("--eod-token", default=None, help="the EOD token's text, if the tokenizer's is not found")
    parser.add_argument("--strict", action="store_true", help="fail on the first malformed line")
    args = parser.parse_args(argv)
    try:
        if not os.path.exists(args.input):
            raise FileNotFoundError(f"input {args.input} does not exist")
        info = TokenizerInfo.from_file(args.tokenizer, args.eod_token)
        for key in args.json_keys:
            prefix = f"{args.output_prefix}_{key}_document"
            report = write_indexed_dataset(numbered_lines(args.input), prefix, args.tokenizer, info.eod,
                                           info.vocab_size, json_key=key, workers=args.workers,
                                           append_eod=args.append_eod, progress=f"{args.input} [{key}]")
            print(report.summary(f"{prefix}.bin/.idx"))
            if args.strict and report.bad_lines:
                for ext in (".bin", ".idx"):
                    os.remove(prefix + ext)
                line, why = report.bad_lines[0]
                raise ValueError(f"{args.input}: line {line}: {why} (--strict: no output written)")
    except (ValueError, FileNotFoundError) as e:
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
