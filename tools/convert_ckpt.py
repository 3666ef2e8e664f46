#!/usr/bin/env python
"""Convert checkpoints between megajoy's own layout and Hugging Face's DeepSeek-V3 layout.

  python tools/convert_ckpt.py --input CKPT --output HF_DIR --to hf [--dtype bf16|fp16|fp32]
  python tools/convert_ckpt.py --input HF_DIR --output CKPT --to megajoy
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megajoy.ckpt.convert import DTYPES, convert  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a megajoy checkpoint, a `megajoy pretrain --out` directory "
                                                       "(its latest checkpoint) or a Hugging Face model directory")
    parser.add_argument("--output", required=True, help="directory to write (replaced atomically)")
    parser.add_argument("--to", required=True, choices=["hf", "megajoy"], help="target layout")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weight dtype of the output (default: bf16 for hf, fp32 for megajoy)")
    parser.add_argument("--int4", action="store_true", help="routed experts as packed INT4 with fp32 group scales "
                        "(compressed-tensors pack-quantized, for vLLM / SGLang); other weights in --dtype")
    parser.add_argument("--int4-group", type=int, choices=[32, 64], default=64)
    args = parser.parse_args(argv)
    try:
        convert(args.input, args.output, args.to, args.dtype, args.int4_group if args.int4 else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"convert_ckpt: error: {e}", file=sys.stderr)
        return 2
    print(f"convert_ckpt: wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
