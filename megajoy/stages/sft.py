"""`megajoy sft`: supervised fine-tuning on chat data (thinking and non-thinking), conversations packed
best-fit-decreasing into rows with block-diagonal masks, loss on assistant tokens only. Data, loss and
defaults live here; everything else is the shared training loop."""

import json
import os
import sys

import torch
import torch.distributed as dist

from megajoy.cli import add_config_arguments
from megajoy.data.packing import held_out_batches
from megajoy.stages.flags import PRETRAIN_DATA_PATHS, add_training_flags, flag_overrides
from megajoy.train.checkpoint import resolve_checkpoint
from megajoy.train.trainer import NextTokenStage, Trainer

# Section defaults: a short CPU-sized run on the built-in demo data.
DEFAULTS = {"optimizer": {"lr": 1e-3, "min_lr": 1e-4, "lr_warmup_iters": 10, "lr_decay_style": "cosine"},
            "data": {"seq_length": 1024}, "train": {"train_iters": 100, "global_batch_size": 8, "micro_batch_size": 2,
                                                   "eval_interval": 25, "eval_iters": 2, "mtp_start_iter": 0},
            "checkpoint": {"out": "runs/sft"}}


class SftStage(NextTokenStage):
    name = "sft"

    def __init__(self, args):
        self.args = args

    def setup(self, trainer: Trainer) -> None:
        from megajoy.data.sft import RowSchedule, pack_rows, padding_fraction

        job, args = trainer.job, self.args
        data = load_chat_data(job, args, trainer.tokenizer_file)
        self.tokenizer = data["tokenizer"]
        self.valid_conversations = [s.source for s in data["valid"]]
        rows = pack_rows(data["train"], job.data.seq_length, self.tokenizer.pad_id, pack=not args.no_pack)
        self.valid_rows = pack_rows(data["valid"], job.data.seq_length, self.tokenizer.pad_id)
        self.schedule = RowSchedule(rows, job.train.seed)
        self.stats = {"rows": len(rows), "conversations": len(data["train"]),
                      "padding_fraction": padding_fraction(rows, self.tokenizer.pad_id), "packed": not args.no_pack}
        self.dp_rank = trainer.pc.coords["dp"] + trainer.pc.coords["cp"] * trainer.pc.size("dp")
        self.dp = trainer.pc.size("dp_cp")
        if trainer.pc.rank == 0:
            print(f"megajoy sft: {data['report']}", file=sys.stderr)
            print(f"megajoy sft: {len(data['train'])} conversations in {len(rows)} rows of {job.data.seq_length} "
                  f"tokens, padding {100 * self.stats['padding_fraction']:.2f}%", file=sys.stderr)

    def train_micro_batches(self, trainer, consumed, global_batch):
        return self.schedule.micro_batches(consumed, global_batch, trainer.job.train.micro_batch_size, self.dp_rank,
                                           self.dp)

    def valid_micro_batches(self, trainer):
        return held_out_batches(self.valid_rows, trainer.job.train.micro_batch_size, self.dp_rank, self.dp)


def load_chat_data(job, args, tokenizer_path: str) -> dict:
    """Tokenizer (template tokens added), train / held-out conversations, and the load report."""
    from megajoy.data.sft import ChatTokenizer, load_conversations, split_held_out

    tokenizer = ChatTokenizer(tokenizer_path, job.model.vocab_size)
    path = data_file(job, args)
    samples, report = load_conversations(path, tokenizer, job.data.seq_length + 1, args.overlong, args.thinking)
    if not samples:
        raise ValueError(f"{path}: no training rows: every conversation was dropped ({report.summary(path)})")
    train, valid = split_held_out(samples, min(args.valid_conversations, len(samples) // 10), job.train.seed)
    return {"tokenizer": tokenizer, "report": report.summary(path), "train": train, "valid": valid}


def exact_match(model, tokenizer, conversations: list[dict], mode: str, max_new_tokens: int = 24) -> tuple[int, int]:
    """(hits, scored): how many conversations' final assistant answer greedy decoding (batched, latent
    cache) reproduces exactly (after the closed reasoning, when the model thinks), of those that have an
    "answer". Every rank that decodes together calls it (see generate), with or without conversations."""
    from megajoy.data.chat import final_answer, opens_reasoning
    from megajoy.data.tokenizer import EOS_TOKEN
    from megajoy.model.generate import SamplingParams, generate

    scored = [c for c in conversations if "answer" in c and c["messages"][-1]["role"] == "assistant"]
    prompts = [answer_prompt(c, mode) for c in scored]
    params = SamplingParams(max_new_tokens, stop_token_ids=(tokenizer.tok.token_to_id(EOS_TOKEN),))
    completions = generate(model, [tokenizer.encode(p).ids for p in prompts], params)
    answers = [final_answer(tokenizer.decode(t), opens_reasoning(p)) for t, p in zip(completions, prompts)]
    return sum(a == c["answer"] for a, c in zip(answers, scored)), len(scored)


def answer_prompt(conversation: dict, mode: str) -> list:
    """The pieces of the conversation up to its final answer, open for generation, in the template mode the
    whole conversation trains in (its answer's reasoning is what makes a conversation think)."""
    from megajoy.data.chat import render, thinking_mode

    form = "on" if thinking_mode(conversation, mode) else "off"
    return render(dict(conversation, messages=conversation["messages"][:-1]), form, generation_prompt=True)


# ------------------------------------------------------------------------------------------ command

def add_arguments(parser) -> None:
    add_config_arguments(parser)
    add_training_flags(parser, without=PRETRAIN_DATA_PATHS)
    group = parser.add_argument_group("SFT data")
    group.add_argument("--data", default=None, metavar="FILE.jsonl",
                       help="chat JSONL ({\"messages\": [...], \"tools\": [...]}); default: the built-in demo data")
    group.add_argument("--thinking", choices=["auto", "on", "off"], default="auto",
                       help="template mode: auto = thinking where a conversation has reasoning_content")
    group.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                       help="conversations longer than --seq-length + 1 tokens")
    group.add_argument("--no-pack", action="store_true", help="one conversation per row, padded (the baseline)")
    group.add_argument("--valid-conversations", type=int, default=64, help="held out for validation and exact match")
    group.add_argument("--demo-conversations", type=int, default=2000)
    group.add_argument("--exact-match-samples", type=int, default=64,
                       help="held-out conversations scored by greedy exact match before and after (0: off)")


def build_job(args, defaults=DEFAULTS, recipes: dict | None = None):
    """The job: the stage's defaults (under `recipes`' entry for --preset, where the stage has one), the
    model of the --init checkpoint (or the preset), then flags."""
    from megajoy.ckpt.native import read_job_config
    from megajoy.config import load_job_config, model_overrides, with_recipe

    defaults = with_recipe(defaults, (recipes or {}).get(args.preset or "tiny"))
    overrides = flag_overrides(args) + args.overrides
    job = load_job_config(args.preset, args.config, overrides, defaults=defaults)
    if not job.checkpoint.init:
        return job
    model = read_job_config(resolve_checkpoint(job.checkpoint.init)).model
    return load_job_config(args.preset, args.config, model_overrides(model) + overrides, defaults=defaults)


def stage_tokenizer(job) -> str:
    """--tokenizer, else the tokenizer stored with the --init checkpoint."""
    if job.data.tokenizer:
        from megajoy.data.tokenizer import tokenizer_file

        return tokenizer_file(job.data.tokenizer)
    if job.checkpoint.init:
        path = os.path.join(resolve_checkpoint(job.checkpoint.init), "tokenizer.json")
        if os.path.exists(path):
            return path
    raise ValueError("no tokenizer: pass --tokenizer, or --init a checkpoint that stores one")


def data_file(job, args, demo_name: str = "demo_sft.jsonl") -> str:
    return args.data or os.path.join(job.checkpoint.out, demo_name)


def prepare_files(job, args, rank: int, demo_name: str = "demo_sft.jsonl", make_demo=None) -> str:
    """Rank 0 writes the stage's tokenizer (template tokens added) into the output directory, and so
    into every checkpoint, and the demo data when no --data is given. Returns the tokenizer's path. The job's
    model takes the template's BOS and EOS ids (the model ends every turn with that EOS), which the checkpoints'
    Hugging Face and GGUF exports stop generation at."""
    from megajoy.data.demo import sft_conversations, write_jsonl
    from megajoy.data.sft import ChatTokenizer
    from megajoy.data.tokenizer import BOS_TOKEN, EOS_TOKEN

    make_demo = make_demo or (lambda: sft_conversations(args.demo_conversations, seed=job.train.seed))
    tokenizer = ChatTokenizer(stage_tokenizer(job), job.model.vocab_size)
    job.model.bos_token_id, job.model.eos_token_id = (tokenizer.tok.token_to_id(t) for t in (BOS_TOKEN, EOS_TOKEN))
    path = os.path.join(job.checkpoint.out, "tokenizer.json")
    if rank == 0:
        os.makedirs(job.checkpoint.out, exist_ok=True)
        tokenizer.save(path + ".tmp")
        os.replace(path + ".tmp", path)
        demo = data_file(job, args, demo_name)
        if not args.data and not os.path.exists(demo):
            write_jsonl(demo, make_demo())
    return path


def run(args) -> int:
    from megajoy.launch import setup_parallel
    from megajoy.parallel.state import rank0_first

    job = build_job(args)
    pc = setup_parallel(job)
    with rank0_first(pc):
        tokenizer_path = prepare_files(job, args, pc.rank)
    stage = SftStage(args)
    trainer = Trainer(job, stage, tokenizer_path, pc)
    before = held_out_exact_match(trainer, stage, args)
    summary = trainer.run()
    after = held_out_exact_match(trainer, stage, args)
    if pc.rank == 0:
        results = {"step": trainer.step, **stage.stats, "exact_match_before": before, "exact_match_after": after,
                   **{k: v for k, v in summary.items() if k.startswith("val_")}}
        with open(os.path.join(trainer.out, "sft_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(f"megajoy sft: step {trainer.step}, validation loss {summary.get('val_loss', float('nan')):.4f}, "
              f"held-out exact match {before} -> {after}; checkpoints in {trainer.out}/checkpoints")
    return 0


def held_out_exact_match(trainer, stage, args) -> float | None:
    """Exact match on the first --exact-match-samples held-out conversations (None if 0; NaN if none has an
    answer), decoded in the run's compute precision, each data-parallel rank a share."""
    if not args.exact_match_samples:
        return None
    pc = trainer.pc
    conversations = stage.valid_conversations[: args.exact_match_samples][pc.coords["dp"]::pc.size("dp")]
    with torch.no_grad(), trainer.autocast():
        hits, scored = exact_match(trainer.model, stage.tokenizer, conversations, args.thinking)
    totals = torch.tensor([float(hits), float(scored)], device=trainer.device)
    if pc.size("dp") > 1:
        dist.all_reduce(totals, group=pc.group("dp"))
    return totals[0].item() / totals[1].item() if totals[1] else float("nan")
