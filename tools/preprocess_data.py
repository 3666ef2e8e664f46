#!/usr/bin/env python
"""Tokenize JSONL into Megatron's indexed format, as Megatron-LM's tools/preprocess_data.py does.

  python tools/preprocess_data.py --input docs.jsonl --output-prefix data/docs --tokenizer tokenizer.json \\
      [--json-keys text] [--workers 4]

writes data/docs_text_document.bin / .idx (EOD appended to every document) for
`megajoy pretrain --data-path data/docs_text_document --tokenizer tokenizer.json`. Blank lines, and
(as in Megatron-LM) texts that are empty, add nothing. Malformed lines are counted and the first 20 reported
with their numbers; `--strict` stops at the first one instead, and a key that 1000 lines lack while none has
it (a wrong --json-keys) stops the run. With several keys, each key's files hold the lines
that have its text (a note says when the keys' document counts differ). The files of every key appear
together, once all are complete: a failed run writes nothing and leaves earlier output under the same
prefix as it was.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megajoy.data.indexed import MalformedItem, all_or_none, write_indexed_dataset  # noqa: E402
from megajoy.data.jsonl import check_input_file, decoded_lines  # noqa: E402
from megajoy.data.tokenizer import TokenizerInfo  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a JSONL file, one document per line")
    parser.add_argument("--output-prefix", required=True, help="output path without the _KEY_document suffix")
    parser.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                        help="a Hugging Face tokenizer.json, or a directory holding one")
    parser.add_argument("--tokenizer-type", choices=["HuggingFaceTokenizer"], default="HuggingFaceTokenizer",
                        help="for Megatron-LM command lines: the one kind read here")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="fields holding the text (default: text)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--append-eod", dest="append_eod", action="store_true", default=True,
                        help="append the end-of-document token to every document (default)")
    parser.add_argument("--no-append-eod", dest="append_eod", action="store_false")
    parser.add_argument("--eod-token", default=None, help="the EOD token's text, if the tokenizer's is not found")
    parser.add_argument("--strict", action="store_true", help="fail on the first malformed line")
    args = parser.parse_args(argv)
    prefixes = {key: f"{args.output_prefix}_{key}_document" for key in dict.fromkeys(args.json_keys)}
    try:
        check_input_file(args.input, "input")
        info = TokenizerInfo.from_file(args.tokenizer, args.eod_token)
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)  # --output-prefix data/docs
        with all_or_none(prefixes.values()):
            reports = {key: write_one_key(args, info, key, prefix) for key, prefix in prefixes.items()}
    except (ValueError, OSError) as e:  # bad input, or the file system refused (permissions, a full disk)
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        return 2
    for key, prefix in prefixes.items():
        print(reports[key].summary(f"{prefix}.bin/.idx"))
    counts = {key: report.documents for key, report in reports.items()}
    if len(set(counts.values())) > 1:
        print(f"preprocess_data: note: the keys hold different numbers of documents ({counts}): a line lacking "
              "a key's text adds nothing to that key's files, so their documents do not pair up by index",
              file=sys.stderr)
    return 0


def write_one_key(args, info: TokenizerInfo, key: str, prefix: str):
    """The staged dataset of one JSON key; a ValueError when it would be unusable."""
    try:
        report = write_indexed_dataset(decoded_lines(args.input), prefix, info.path, info.eod, info.vocab_size,
                                       json_key=key, workers=args.workers, append_eod=args.append_eod,
                                       progress=f"{args.input} [{key}]", strict=args.strict, commit=False)
    except MalformedItem as e:
        raise ValueError(f"{args.input}: {e} (--strict: no output written)") from None
    if report.tokens == 0:
        raise ValueError(f"{args.input}: no tokens for key {key!r} ({report.summary(args.input)}); "
                         f"no output written")
    return report


if __name__ == "__main__":
    raise SystemExit(main())
