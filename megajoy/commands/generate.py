"""`megajoy generate --ckpt DIR --prompt TEXT`: decode with the latent KV cache (batched, sampled or
greedy), or greedily with MTP self-speculative decoding (`--mtp-draft K`)."""

import json
import sys
import time


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
                        help="greedy decoding with K tokens drafted by the MTP module per verification pass")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt (text, token ids, stats)")


def load_for_generation(path: str):
    """(model in eval mode, tokenizer) from any checkpoint that stores its tokenizer."""
    from megajoy.ckpt.native import load_model_dir
    from megajoy.data.sft import ChatTokenizer
    from megajoy.model import create_model
    from megajoy.parallel.params import parameter_specs
    from megajoy.parallel.state import load_full_model_state
    from megajoy.train.checkpoint import resolve_checkpoint

    directory = resolve_checkpoint(path)
    job, state, tokenizer_path = load_model_dir(directory)
    if tokenizer_path is None:
        raise ValueError(f"{directory}: no tokenizer.json stored with the checkpoint")
    model = create_model(job.model, seed=None)
    load_full_model_state(model, state, parameter_specs(model, model.pc), model.pc, directory)
    return model.eval(), ChatTokenizer(tokenizer_path, job.model.vocab_size)


def prompt_ids(tokenizer, text: str, chat: bool, thinking: bool) -> list[int]:
    from megajoy.data.chat import render
    from megajoy.data.tokenizer import BOS_TOKEN

    if chat:
        pieces = render({"messages": [{"role": "user", "content": text}]}, "on" if thinking else "off",
                        generation_prompt=True)
        return tokenizer.encode(pieces).ids
    return tokenizer.tok.encode(BOS_TOKEN + text, add_special_tokens=False).ids


def run(args) -> int:
    from megajoy.data.tokenizer import EOS_TOKEN
    from megajoy.model.generate import SamplingParams, generate, speculative_greedy

    model, tokenizer = load_for_generation(args.ckpt)
    stop_text = args.stop or [EOS_TOKEN]
    stops = []
    for text in stop_text:
        ids = tokenizer.tok.encode(text, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"--stop {text!r} is {len(ids)} tokens; a stop must be exactly one token")
        stops.append(ids[0])
    prompts = [prompt_ids(tokenizer, p, args.chat, args.thinking) for p in args.prompt]
    started = time.perf_counter()
    stats = [None] * len(prompts)
    if args.mtp_draft:
        if args.temperature > 0:
            raise ValueError("--mtp-draft decodes greedily: leave --temperature at 0")
        results = []
        for i, p in enumerate(prompts):
            tokens, stats[i] = speculative_greedy(model, p, args.max_new_tokens, args.mtp_draft, stops)
            results.append(tokens)
    else:
        params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, tuple(stops), args.seed)
        results = generate(model, prompts, params)
    seconds = time.perf_counter() - started
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
