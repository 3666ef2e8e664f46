"""SFT throughput: conversations packed best-fit-decreasing into rows with block-diagonal masks, against
each conversation padded to the sequence length (the baseline the issue names), and, for reference,
against padding each micro-batch only to its longest conversation. All three train the same model
(forward, backward, AdamW step) on the same demo conversations in the same run; the figure of merit
is conversation tokens (padding excluded) per second.

  python benchmarks/sft_packing.py                          # tiny preset, 1024-token rows, CPU
  python benchmarks/sft_packing.py --seq-length 2048 --micro-batch-size 1
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, print_table, synchronize, write_json  # noqa: E402


def in_padding(batch, pad_id: int) -> torch.Tensor:
    """[B, S]: the input positions of the padding document that ends a padded row (a row its conversations
    fill has none)."""
    return (batch.document_ids == batch.document_ids[:, -1:]) & (batch.input_ids[:, -1:] == pad_id)


def trimmed(batch, pad_id: int):
    """The micro-batch cut to its longest conversation (padding to the longest, not to the row)."""
    from megajoy.data.packing import Batch

    length = int((~in_padding(batch, pad_id)).sum(dim=1).max())
    return Batch(**{name: t[:, :length] for name, t in batch.tensors().items()})


def batches_for(rows, micro: int, seed: int, trim: bool, pad_id: int):
    from megajoy.data.packing import stack

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    batches = [stack([rows[i] for i in order[s:s + micro]]) for s in range(0, len(order) - micro + 1, micro)]
    return [trimmed(b, pad_id) for b in batches] if trim else batches


def conversation_tokens(batch, pad_id: int) -> int:
    """Input positions holding conversation tokens (not the padding document that ends a padded row)."""
    return int(batch.input_ids.numel() - in_padding(batch, pad_id).sum())


def measure(model, optimizer, batches, device, seconds: float, pad_id: int) -> dict:
    """Train on the batches for about `seconds` (after one warm-up step); tokens/s of conversation."""

    def step(batch):
        batch = batch.to(device)
        out = model(batch.input_ids, batch.position_ids, batch.document_ids, batch.labels, batch.loss_mask,
                    compute_mtp=False, return_logits=False)
        (out.lm_loss_sum / out.lm_tokens.clamp(min=1)).backward()
        optimizer.step()
        optimizer.zero_grad()

    step(batches[0])
    synchronize(device)
    start, tokens, positions, steps = time.perf_counter(), 0, 0, 0
    for batch in batches[1:]:
        step(batch)
        tokens += conversation_tokens(batch, pad_id)
        positions += batch.input_ids.numel()
        steps += 1
        synchronize(device)
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    return {"steps": steps, "seconds": elapsed, "conversation_tokens_per_s": tokens / elapsed,
            "padding": 1 - tokens / positions}


def main() -> None:
    from megajoy.config import load_job_config
    from megajoy.data.chat import render
    from megajoy.data.demo import sft_conversations
    from megajoy.data.pretrain import resolve_data
    from megajoy.data.sft import ChatTokenizer, pack_rows
    from megajoy.model import create_model
    from megajoy.optim import adamw

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30, help="time spent training per variant")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sft_packing.json"))
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    job = load_job_config("tiny", None, [])
    _, tokenizer_info = resolve_data(job)
    tokenizer = ChatTokenizer(tokenizer_info.path, job.model.vocab_size)
    samples = [tokenizer.encode(render(c)) for c in sft_conversations(args.conversations, seed=0)]
    samples = [s for s in samples if len(s.ids) <= args.seq_length + 1]
    variants = {"packed (best-fit decreasing)": (pack_rows(samples, args.seq_length, tokenizer.pad_id), False),
                "padded to the sequence length": (pack_rows(samples, args.seq_length, tokenizer.pad_id, False), False),
                "padded to the micro-batch's longest": (pack_rows(samples, args.seq_length, tokenizer.pad_id, False),
                                                        True)}
    results = []
    for name, (rows, trim) in variants.items():
        torch.manual_seed(0)
        model = create_model(job.model, device=device).train()
        optimizer = adamw([{"params": list(model.parameters())}], job.optimizer)
        batches = batches_for(rows, args.micro_batch_size, 0, trim, tokenizer.pad_id)
        stats = measure(model, optimizer, batches, device, args.seconds, tokenizer.pad_id)
        results.append({"variant": name, "rows": len(rows), **stats})
        print(f"{name}: {stats['conversation_tokens_per_s']:,.0f} conversation tokens/s", file=sys.stderr)
    base = results[1]["conversation_tokens_per_s"]
    for r in results:
        r["speedup_vs_padded_to_sequence"] = r["conversation_tokens_per_s"] / base
    print_table(results, ["variant", "rows", "steps", "padding", "conversation_tokens_per_s",
                          "speedup_vs_padded_to_sequence"])
    write_json(args.out, {"environment": environment(device), "model": "tiny preset", "seq_length": args.seq_length,
                          "micro_batch_size": args.micro_batch_size, "results": results})


if __name__ == "__main__":
    main()
