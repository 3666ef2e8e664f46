#!/usr/bin/env python
"""Convert checkpoints between megajoy's own layout, Hugging Face's DeepSeek-V3 layout and GGUF.

  python tools/convert_ckpt.py --input CKPT --output HF_DIR --to hf [--dtype bf16|fp16|fp32] [--int4]
  python tools/convert_ckpt.py --input HF_DIR --output CKPT --to megajoy
  python tools/convert_ckpt.py --input CKPT_OR_HF_DIR --output model.gguf --to gguf --gguf-type q8_0

--input takes a megajoy checkpoint (model directory or training checkpoint at any parallel layout), a
`megajoy pretrain --out` directory (its latest checkpoint) or a Hugging Face directory. Tensors are
read, converted and written one at a time; the output appears complete or not at all.
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megajoy.ckpt.convert import DTYPES, TARGETS, convert  # noqa: E402
from megajoy.ckpt.gguf_export import GGUF_TYPES  # noqa: E402


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, as transformers reads sizes: KB / MB / GB decimal, KiB / MiB / GiB binary, and a
    lowercase b for bits ('5Gb' = 625e6 bytes)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    bits = text.strip().endswith("b")  # "5Gb": gigabits, as transformers reads it
    for unit, factor in units.items():
        if upper.endswith(unit):
            try:
                size = float(upper[:-len(unit)]) * factor / (8 if bits else 1)
            except ValueError:
                break
            if math.isfinite(size) and size >= 1:
                return int(size)
            break
    raise argparse.ArgumentTypeError(f"{text!r} is not a positive size like 5GB, 500MB or 2GiB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a megajoy checkpoint, a `megajoy pretrain --out` directory "
                                                       "(its latest checkpoint) or a Hugging Face model directory")
    parser.add_argument("--output", required=True, help="directory (hf, megajoy) or file (gguf) to write, "
                                                        "replaced atomically")
    parser.add_argument("--to", required=True, choices=TARGETS, help="target format")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weight dtype of the output (default: bf16 for hf, fp32 for megajoy; for gguf, "
                             "the type of the tensors --gguf-type qat does not quantise, default bf16)")
    parser.add_argument("--int4", action="store_true", help="routed experts as packed INT4 with fp32 group scales "
                        "(compressed-tensors pack-quantized, for vLLM / SGLang); other weights in --dtype")
    parser.add_argument("--int4-group", type=int, choices=[32, 64], default=None,
                        help="INT4 group size, implies --int4 (default: an INT4 input's own group, else the "
                             "checkpoint's --qat-group if it was trained with --qat int4, else 64)")
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                        help="largest safetensors shard (hf, megajoy), e.g. 5GB, 500MB, 2GiB (default 5GB)")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16",
                        help="GGUF tensor type (norms, 1-D tensors and the router stay f32); qat: the tensors "
                             "trained with --qat q4_0|q8_0 on their exact training grid, the rest in --dtype")
    parser.add_argument("--gguf-tokenizer-pre", default=None,
                        help="llama.cpp pre-tokenizer name, when it cannot be detected from tokenizer.json")
    args = parser.parse_args(argv)
    try:
        notes = convert(args.input, args.output, args.to, args.dtype, args.int4_group,
                        args.gguf_type, args.gguf_tokenizer_pre, args.max_shard_size, int4=args.int4)
    except (ValueError, OSError) as e:  # bad input, or the file system refused (permissions, a full disk)
        print(f"convert_ckpt: error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"convert_ckpt: note: {note}", file=sys.stderr)
    print(f"convert_ckpt: wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
