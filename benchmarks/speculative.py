"""MTP self-speculative decoding: acceptance and speed against plain greedy decoding with the same latent
KV cache, one prompt at a time, on held-out demo chat prompts (thinking arithmetic, instructions, tool
calls) in the same run. Every speculative output is checked equal to the plain one.

  python benchmarks/speculative.py --ckpt runs/sft            # a checkpoint whose MTP module is trained
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402


def main() -> None:
    from megajoy.commands.generate import load_for_generation
    from megajoy.data.chat import render
    from megajoy.data.demo import sft_conversations
    from megajoy.data.tokenizer import EOS_TOKEN
    from megajoy.model.generate import SamplingParams, generate, speculative_greedy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--drafts", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "speculative.json"))
    args = parser.parse_args()

    model, tokenizer = load_for_generation(args.ckpt)
    eos = tokenizer.tok.token_to_id(EOS_TOKEN)
    conversations = sft_conversations(args.prompts, seed=12345)  # not the training seed
    prompts = [tokenizer.encode(render(dict(c, messages=c["messages"][:-1]), generation_prompt=True)).ids
               for c in conversations]

    def plain():
        return [generate(model, [p], SamplingParams(args.max_new_tokens, stop_token_ids=(eos,)))[0] for p in prompts]

    # One untimed pass of each method first: the first calls pay one-time costs (allocator, lazy
    # initialisation) that would otherwise all land on the baseline, timed first.
    generate(model, prompts[:1], SamplingParams(args.max_new_tokens, stop_token_ids=(eos,)))
    speculative_greedy(model, prompts[0], args.max_new_tokens, args.drafts[0], (eos,))
    start = time.perf_counter()
    reference = plain()
    base_seconds = time.perf_counter() - start
    tokens = sum(len(t) for t in reference)
    rows = [{"method": "greedy, latent cache", "tokens_per_s": tokens / base_seconds, "speedup": 1.0}]
    for k in args.drafts:
        start, passes, drafted, accepted = time.perf_counter(), 0, 0, 0
        for p, want in zip(prompts, reference):
            got, stats = speculative_greedy(model, p, args.max_new_tokens, k, (eos,))
            if got != want:
                raise AssertionError(f"speculative output differs from greedy for prompt {p}")
            passes, drafted, accepted = passes + stats.verify_passes, drafted + stats.drafted, accepted + stats.accepted
        seconds = time.perf_counter() - start
        rows.append({"method": f"MTP draft K={k}", "acceptance_rate": accepted / max(drafted, 1),
                     "tokens_per_pass": (accepted + passes) / max(passes, 1), "tokens_per_s": tokens / seconds,
                     "speedup": base_seconds / seconds})
    print_table(rows, ["method", "acceptance_rate", "tokens_per_pass", "tokens_per_s", "speedup"])
    device = next(model.parameters()).device
    write_json(args.out, {"environment": environment(torch.device(device)), "checkpoint": args.ckpt,
                          "prompts": len(prompts), "generated_tokens": tokens, "results": rows})


if __name__ == "__main__":
    main()
