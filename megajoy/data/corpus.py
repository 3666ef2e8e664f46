"""The built-in corpus: Python standard-library source files, present on every Python installation.

Built once per machine (tokenizer trained on it, then tokenized into Megatron's format) and cached
under `$MEGAJOY_CACHE` (default `~/.cache/megajoy`), keyed by the file list, the vocabulary size and
this module's version.
"""

import hashlib
import json
import os
import sys
import sysconfig

from megajoy.ckpt.atomic import atomic_directory

# 2: the chat template tokens are special tokens of the built-in tokenizer; 3: empty files add no lone EOD
CORPUS_VERSION = 3
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
PREFIX_NAME = "corpus_text_document"


def cache_root() -> str:
    return os.environ.get("MEGAJOY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megajoy")


def stdlib_files(max_bytes: int) -> list[tuple[str, int]]:
    """(path, size) of standard-library .py files in sorted order, up to `max_bytes` in total."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                found.append((os.path.relpath(path, root), os.path.getsize(path)))
    found.sort()
    chosen, total = [], 0
    for rel, size in found:
        if total + size > max_bytes:
            break
        chosen.append((os.path.join(root, rel), size))
        total += size
    return chosen


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def builtin_corpus(vocab_size: int, max_mb: float = 16.0, workers: int = 1, quiet: bool = False) -> dict:
    """Build (or reuse) the corpus; returns its manifest: tokenizer path, data prefix, sizes."""
    files = stdlib_files(int(max_mb * 2**20))
    key = hashlib.sha256(json.dumps([CORPUS_VERSION, vocab_size, sys.version_info[:2],
                                     [(os.path.basename(p), s) for p, s in files]]).encode()).hexdigest()[:16]
    directory = os.path.join(cache_root(), f"corpus-{key}")
    manifest_path = os.path.join(directory, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            return json.load(f)
    if not quiet:
        print(f"megajoy: building the built-in corpus ({len(files)} standard-library files, "
              f"{sum(s for _, s in files) / 2**20:.1f} MiB) in {directory}", file=sys.stderr)
    with atomic_directory(directory) as tmp:
        manifest = _build(files, vocab_size, tmp, workers, quiet)
        manifest_final = {**manifest, "tokenizer": os.path.join(directory, "tokenizer.json"),
                          "prefix": os.path.join(directory, PREFIX_NAME)}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest_final, f, indent=2)
    return manifest_final


def _build(files: list[tuple[str, int]], vocab_size: int, directory: str, workers: int, quiet: bool) -> dict:
    from megajoy.data.indexed import write_indexed_dataset
    from megajoy.data.tokenizer import TokenizerInfo, train_bpe

    tokenizer_path = os.path.join(directory, "tokenizer.json")
    train_bpe((_read(p) for p, _ in files), vocab_size, tokenizer_path)
    info = TokenizerInfo.from_file(tokenizer_path)
    report = write_indexed_dataset(((i, _read(p)) for i, (p, _) in enumerate(files, start=1)),
                                   os.path.join(directory, PREFIX_NAME), tokenizer_path, info.eod,
                                   info.vocab_size, workers=workers,
                                   progress=None if quiet else "tokenizing the built-in corpus")
    return {"files": len(files), "bytes": sum(s for _, s in files), "documents": report.documents,
            "tokens": report.tokens, "vocab_size": info.vocab_size, "python": sys.version.split()[0]}
