"""`megajoy generate --ckpt DIR --prompt TEXT`: decode with the latent KV cache (batched, sampled or
greedy), or greedily with MTP self-speculative decoding (`--mtp-draft K`). Under torchrun or srun with
layout flags (`--tp`, `--pp`, `--ep`, `--dp`) each rank loads its share of the model; data-parallel ranks
decode a share of the prompts each, and rank 0 prints every completion in the prompts' order."""

import json
import os
import sys
import time

from megajoy.stages.flags import LAYOUT_PATHS, add_training_flags, flag_overrides


def add_arguments(parser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="DIR",
                        help="model directory, training checkpoint, or a training --out directory (its latest)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user turn of the chat template, ready for the answer")
    parser.add_argument("--thinking", action="store_true", help="with --chat: open the answer with <think>")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=None, metavar="TOKEN",
                        help="stop token (text of one token); default: the end-of-sentence token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mtp-draft", type=int, default=0, metavar="K",
                        help="greedy decoding with K tokens drafted by the MTP module per verification pass "
                             "(under --dp, --tp, --ep; not --pp)")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt (text, token ids, stats)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 weights and latent cache (half the fp32 checkpoint's memory), computing under "
                             "bf16 autocast as training's --bf16 --params-dtype bf16 does")
    add_training_flags(parser, LAYOUT_PATHS, "layout (under torchrun / srun; Megatron-LM names)")


def load_for_generation(path: str, layout: list[str] | None = None, bf16: bool = False):
    """(model in eval mode, tokenizer) from any checkpoint that stores its tokenizer. `layout`:
    `parallel.field=value` overrides; with them (and under torchrun / srun) this rank's share of the model,
    on this rank's device. `bf16`: the weights held in bf16, each rounded as it is loaded (the router bias stays
    fp32), so the rank never holds its share in fp32."""
    import torch

    from megajoy.ckpt.native import TOKENIZER_NAME, read_job_config
    from megajoy.config import load_job_config, model_overrides
    from megajoy.data.sft import ChatTokenizer
    from megajoy.launch import setup_parallel
    from megajoy.model import create_model
    from megajoy.parallel.params import parameter_specs
    from megajoy.train.checkpoint import load_weights, resolve_checkpoint

    directory = resolve_checkpoint(path)
    tokenizer_path = os.path.join(directory, TOKENIZER_NAME)
    if not os.path.exists(tokenizer_path):
        raise ValueError(f"{directory}: no tokenizer.json stored with the checkpoint")
    job = load_job_config(None, None, model_overrides(read_job_config(directory).model) + list(layout or []))
    pc = setup_parallel(job) if layout is not None else None
    model = create_model(job.model, seed=None, pc=pc, device=pc.device if pc else "cpu",
                         dtype=torch.bfloat16 if bf16 else torch.float32)
    load_weights(model, parameter_specs(model, model.pc), model.pc, directory)
    return model.eval(), ChatTokenizer(tokenizer_path, job.model.vocab_size)


def prompt_ids(tokenizer, text: str, chat: bool, thinking: bool) -> list[int]:
    from megajoy.data.chat import render
    from megajoy.data.tokenizer import BOS_TOKEN

    if chat:
        pieces = render({"messages": [{"role": "user", "content": text}]}, "on" if thinking else "off",
                        generation_prompt=True)
        return tokenizer.encode(pieces).ids
    return tokenizer.tok.encode(BOS_TOKEN + text, add_special_tokens=False).ids


def check_flags(args) -> None:
    """Flags that contradict each other, refused before the model loads."""
    if args.mtp_draft and args.temperature > 0:
        raise ValueError("--mtp-draft decodes greedily: leave --temperature at 0")
    if args.temperature == 0 and (args.top_k or args.top_p != 1):
        raise ValueError("--top-k / --top-p shape sampling, but --temperature 0 decodes greedily: "
                         "set --temperature above 0 to sample")
    if args.thinking and not args.chat:
        raise ValueError("--thinking opens the chat template's answer with <think>: it needs --chat")


def run(args) -> int:
    import contextlib

    from megajoy.data.tokenizer import EOS_TOKEN
    from megajoy.kernels.backend import bf16_autocast

    check_flags(args)
    model, tokenizer = load_for_generation(args.ckpt, flag_overrides(args), args.bf16)
    stop_text = args.stop or [EOS_TOKEN]
    stops = []
    for text in stop_text:
        ids = tokenizer.tok.encode(text, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"--stop {text!r} is {len(ids)} tokens; a stop must be exactly one token")
        stops.append(ids[0])
    prompts = [prompt_ids(tokenizer, p, args.chat, args.thinking) for p in args.prompt]
    started = time.perf_counter()
    with bf16_autocast(model.pc.device.type) if args.bf16 else contextlib.nullcontext():
        results, stats = _decode_shares(model, prompts, args, tuple(stops))
    seconds = time.perf_counter() - started
    if model.pc.rank != 0:
        return 0
    for text, tokens, stat in zip(args.prompt, results, stats):
        completion = tokenizer.decode(tokens)
        if args.json:
            record = {"prompt": text, "completion": completion, "token_ids": tokens}
            if stat is not None:
                record.update(acceptance_rate=stat.acceptance_rate, tokens_per_pass=stat.tokens_per_pass)
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(completion)
    total = sum(len(t) for t in results)
    print(f"megajoy generate: {total} tokens in {seconds:.2f} s ({total / max(seconds, 1e-9):.1f} tokens/s)",
          file=sys.stderr)
    return 0


def _decode_shares(model, prompts: list[list[int]], args, stops: tuple) -> tuple[list, list]:
    """(completions, speculative statistics or None) of every prompt, in order: each data-parallel rank
    decodes prompts dp_rank, dp_rank + dp, ... (sampling keyed by the prompt's index, as in one process),
    and the shares are gathered."""
    import torch.distributed as dist

    from megajoy.model.generate import SamplingParams, check_prompts, generate, speculative_decode

    # Every rank checks every prompt: the ranks fail together (not one, leaving the others waiting in a
    # collective), naming the prompt by its place on the command line rather than in a rank's share.
    check_prompts(model, prompts, args.max_new_tokens)
    pc = model.pc
    mine = list(range(pc.coords["dp"], len(prompts), pc.size("dp")))
    if args.mtp_draft:
        decoded = speculative_decode(model, [prompts[i] for i in mine], args.max_new_tokens, args.mtp_draft, stops)
    else:
        params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, stops, args.seed)
        decoded = [(tokens, None) for tokens in generate(model, [prompts[i] for i in mine], params, row_ids=mine)]
    shares = [list(zip(mine, decoded))]
    if pc.size("dp") > 1:
        shares = [None] * pc.size("dp")
        dist.all_gather_object(shares, list(zip(mine, decoded)), group=pc.group("dp"))
    ordered = dict(item for share in shares for item in share)
    return [ordered[i][0] for i in range(len(prompts))], [ordered[i][1] for i in range(len(prompts))]
