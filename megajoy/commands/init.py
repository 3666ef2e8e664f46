"""`megajoy init`: a randomly initialised checkpoint (safetensors, config and tokenizer when given)."""

from megajoy.cli import add_config_arguments, job_config_from_args

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None,
                        help="a Hugging Face tokenizer.json (or a directory holding one) to store with the weights")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")


def run(args) -> int:
    import torch

    from megajoy.ckpt.native import model_state, save_model_dir
    from megajoy.ckpt.view import state_view
    from megajoy.data.tokenizer import load_tokenizer, tokenizer_file
    from megajoy.model import create_model

    job = job_config_from_args(args)
    tokenizer = tokenizer_file(args.tokenizer) if args.tokenizer else None
    if tokenizer:
        vocab = load_tokenizer(tokenizer).get_vocab_size()
        if vocab > job.model.vocab_size:
            raise ValueError(f"{tokenizer}: the tokenizer has {vocab} tokens, more than the model's "
                             f"vocab_size={job.model.vocab_size}")
    dtype = getattr(torch, DTYPES[args.dtype])
    model = create_model(job.model, seed=args.seed, dtype=dtype)
    save_model_dir(args.out, state_view(job, model_state(model), tokenizer), dtype)
    print(f"megajoy init: wrote {args.out}")
    return 0
