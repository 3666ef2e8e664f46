"""JSONL files read line by line, with the line numbers that error messages name.

Blank lines are skipped and a UTF-8 byte-order mark before the first line is allowed, as Hugging Face
`datasets` reads JSONL; a line that is not UTF-8 becomes an `Unreadable` item for the caller to
report or refuse."""

import json
import os
import re
from collections.abc import Iterator


class Unreadable(str):
    """An input item that could not be read (its text is the reason), reported like a malformed line."""


LONE_SURROGATE = "holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), which is no text a tokenizer can encode"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def has_lone_surrogate(line: str, value) -> bool:
    """Whether `value`, parsed from JSON `line`, holds a lone surrogate ("\\ud83d" without its pair): valid
    JSON that Python parses, but the tokenizers library refuses. Only a surrogate escape in the line can make
    one, so other lines (ASCII-escaped text included) are not serialised again."""
    if not _SURROGATE_ESCAPE.search(line):
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_input_file(path: str, what: str = "data file") -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory, not a JSONL file")


def decoded_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text without its line ending) for every line that is not blank."""
    check_input_file(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield number, Unreadable(f"invalid UTF-8 ({e.reason} at byte {e.start} of the line)")
                continue
            if line.strip():
                yield number, line.rstrip("\r\n")


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error."""
    for number, line in decoded_lines(path):
        if isinstance(line, Unreadable):
            raise ValueError(f"{path}:{number}: {line}")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        if has_lone_surrogate(line, obj):
            raise ValueError(f"{path}:{number}: the line {LONE_SURROGATE}")
        yield number, obj
