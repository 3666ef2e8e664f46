"""Decoding through a two-stage pipeline: the rows going round in groups (each stage stepping another
group at once, `megajoy.model.pipelined_decoding`) against the whole batch stepping through the stages in
turn, in the same run, with the same random weights (and so the same tokens, which the script checks).
Forked gloo ranks on the CPU, or one rank per GPU under torchrun (`--torchrun`).

  python benchmarks/pipelined_decoding.py                     # 2 ranks on this machine's CPU
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, print_table, synchronize, write_json  # noqa: E402


def decode_both_ways(rank: int, world: int, cfg_fields: dict, batch: int, prompt_length: int,
                     new_tokens: int, repeats: int) -> dict:
    """On one rank of the pipeline: the best seconds of each way's decodes (alternating), and their tokens."""
    from megajoy.config import JobConfig, ModelConfig, ParallelConfig
    from megajoy.launch import setup_parallel
    from megajoy.model import create_model
    from megajoy.model.generate import SamplingParams, whole_sequences
    from megajoy.model.pipelined_decoding import generate_pipelined

    cfg = ModelConfig(**cfg_fields)
    job = JobConfig(model=cfg, parallel=ParallelConfig(pipeline_model_parallel_size=world))
    pc = setup_parallel(job)
    model = create_model(cfg, device=pc.device, pc=pc, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (prompt_length,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(new_tokens, temperature=1.0, seed=2)  # no stop token: every row runs to the end
    row_ids = torch.arange(batch, device=pc.device)
    results = {}
    with torch.no_grad(), whole_sequences(model):
        for overlap in (False, True, False, True):
            for _ in range(repeats):
                synchronize(pc.device)
                start = time.perf_counter()
                tokens = generate_pipelined(model, prompts, params, pc.device, None, row_ids, overlap=overlap)
                synchronize(pc.device)
                seconds = time.perf_counter() - start
                best, _ = results.get(overlap, (float("inf"), None))
                results[overlap] = (min(best, seconds), tokens)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="decodes per round (two rounds each way; best kept)")
    parser.add_argument("--torchrun", action="store_true", help="this process is one rank of torchrun")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "pipelined_decoding.json"))
    args = parser.parse_args()
    h = args.hidden_size
    cfg_fields = dict(vocab_size=8192, hidden_size=h, intermediate_size=3 * h, moe_intermediate_size=h // 2,
                      num_hidden_layers=args.layers, num_attention_heads=max(h // 64, 1), q_lora_rank=h // 2,
                      kv_lora_rank=h // 4, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                      n_routed_experts=16, num_experts_per_tok=4, num_nextn_predict_layers=0)
    run_args = (cfg_fields, args.batch, args.prompt_length, args.new_tokens, args.repeats)
    if args.torchrun:
        world = int(os.environ["WORLD_SIZE"])
        results = decode_both_ways(int(os.environ["RANK"]), world, *run_args)
        if int(os.environ["RANK"]) != 0:
            return
    else:
        from megajoy.parallel.spawn import run_workers

        world = 2
        results = run_workers(world, decode_both_ways, *run_args)[0]
    (turn_s, turn_tokens), (ring_s, ring_tokens) = results[False], results[True]
    if turn_tokens != ring_tokens:
        raise AssertionError("the two ways decoded different tokens")
    tokens = args.batch * args.new_tokens
    rows = [{"method": "stages in turn (one group)", "seconds": turn_s, "tokens_per_s": tokens / turn_s,
             "speedup": 1.0},
            {"method": f"ring of {world} groups", "seconds": ring_s, "tokens_per_s": tokens / ring_s,
             "speedup": turn_s / ring_s}]
    print(f"pipeline of {world} ranks, batch {args.batch}, prompts of {args.prompt_length}, {args.new_tokens} new "
          f"tokens, hidden {h}, {args.layers} layers")
    print_table(rows, ["method", "seconds", "tokens_per_s", "speedup"])
    device = torch.device("cuda") if args.torchrun and torch.cuda.is_available() else torch.device("cpu")
    write_json(args.out, {"environment": environment(device), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
