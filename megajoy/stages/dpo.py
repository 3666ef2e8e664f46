"""`megajoy dpo`: direct preference optimisation on prompt / chosen / rejected pairs, each pair's two
sequences packed side by side in a row. The reference log-probabilities come from the initial model,
either precomputed for every row in a first pass (`--reference cached`, the default) or from a frozen
copy run beside the policy each step (`--reference model`). Data, loss and defaults live here;
everything else is the shared training loop."""

import json
import os
import sys

import torch
import torch.distributed as dist

from megajoy.cli import add_config_arguments
from megajoy.data.packing import held_out_batches, stack
from megajoy.stages import sft
from megajoy.stages.dpo_loss import (LOSSES, check_loss_type, chosen_mask, dpo_terms, pair_count, pair_logps,
                                     pair_token_counts, present_pairs)
from megajoy.stages.flags import PRETRAIN_DATA_PATHS, add_training_flags
from megajoy.train.trainer import Stage, Trainer

# Section defaults: a short CPU-sized run on the built-in demo pairs.
DEFAULTS = {"optimizer": {"lr": 1e-4, "min_lr": 1e-5, "lr_warmup_iters": 5, "lr_decay_style": "cosine"},
            "data": {"seq_length": 512}, "train": {"train_iters": 60, "global_batch_size": 8, "micro_batch_size": 4,
                                                  "eval_interval": 20, "eval_iters": 2}, "checkpoint": {"out": "runs/dpo"}}
# JOYAI.md section 6 for the JoyAI presets: 1,000 steps, LR 1e-6 cosine to 1e-7, global batch 256 (here
# packed rows of 4,096 tokens, each holding at least one pair).
RECIPES = {"joyai-flash": {"optimizer": {"lr": 1e-6, "min_lr": 1e-7, "lr_decay_style": "cosine"},
                           "data": {"seq_length": 4096},
                           "train": {"train_iters": 1000, "global_batch_size": 256, "micro_batch_size": 1,
                                     "eval_interval": 100}}}
RECIPES["joyai-slice"] = RECIPES["joyai-flash"]
DEMO_FILE = "demo_dpo.jsonl"


class DpoStage(Stage):
    name = "dpo"

    def __init__(self, args):
        self.args = args
        self.reference, self.reference_pipeline = None, None

    # ------------------------------------------------------------------ data
    def setup(self, trainer: Trainer) -> None:
        from megajoy.data.sft import RowSchedule

        data = load_pair_data(trainer.job, self.args, trainer.tokenizer_file)
        self.tokenizer = data["tokenizer"]
        self.valid_conversations = [chosen_conversation(p.source) for p in data["valid"]]
        self.dp_rank = trainer.pc.coords["dp"] + trainer.pc.coords["cp"] * trainer.pc.size("dp")
        self.dp = trainer.pc.size("dp_cp")
        rows, self.valid_rows = data["train_rows"], data["valid_rows"]
        if self.args.reference == "model":
            self._build_frozen_reference(trainer)
            self.fill_reference(trainer, self.valid_rows)
        else:
            self.fill_reference(trainer, rows + self.valid_rows)
        self.schedule = RowSchedule(rows, trainer.job.train.seed)
        self.stats = {"rows": len(rows), "pairs": len(data["train"]), "reference": self.args.reference,
                      "loss_type": self.args.loss_type}
        if trainer.pc.rank == 0:
            print(f"megajoy dpo: {data['report']}", file=sys.stderr)
            print(f"megajoy dpo: {len(data['train'])} pairs in {len(rows)} rows of {trainer.job.data.seq_length} "
                  f"tokens; reference log-probabilities: {self.args.reference}", file=sys.stderr)

    def _build_frozen_reference(self, trainer: Trainer) -> None:
        from megajoy.model import create_model
        from megajoy.parallel.pipeline import PipelineRunner

        dtype = next(trainer.model.parameters()).dtype  # bf16 under --params-dtype bf16, as the policy
        self.reference = create_model(trainer.job.model, device=trainer.device, seed=None, dtype=dtype, pc=trainer.pc)
        self.reference.load_state_dict(trainer.model.state_dict())
        self.reference.requires_grad_(False).eval()
        # The same GEMMs as the policy at step 0 (FP8 if on); QAT, switched on later, is not copied: the
        # reference is the initial model in either mode.
        policy = dict(trainer.model.named_modules())
        for name, module in self.reference.named_modules():
            if hasattr(module, "matmul"):
                module.matmul = policy[name].matmul
        if trainer.pipeline is not None:
            self.reference_pipeline = PipelineRunner(self.reference, trainer.pc)

    def fill_reference(self, trainer: Trainer, rows: list) -> None:
        """Set every row's reference log-probabilities. Each data-parallel rank scores a share of the
        rows, then the shares are gathered."""
        if not rows:
            return
        micro = trainer.job.train.micro_batch_size
        share = -(-len(rows) // (self.dp * micro)) * micro  # rows per rank, whole micro-batches
        mine = [rows[i % len(rows)] for i in range(self.dp_rank * share, (self.dp_rank + 1) * share)]
        batches = [stack(mine[i:i + micro]) for i in range(0, share, micro)]
        local = torch.cat(trainer.label_logps(batches, self.reference, self.reference_pipeline))
        if self.dp > 1:
            local = local.to(trainer.device)
            shares = [torch.empty_like(local) for _ in range(self.dp)]
            dist.all_gather(shares, local, group=trainer.pc.group("dp_cp"))
            local = torch.cat(shares).cpu()
        for i, row in enumerate(rows):
            row.ref_logps = local[i:i + 1]

    def train_micro_batches(self, trainer, consumed, global_batch):
        batches = self.schedule.micro_batches(consumed, global_batch, trainer.job.train.micro_batch_size,
                                              self.dp_rank, self.dp)
        if self.reference is not None:
            for batch, logps in zip(batches, trainer.label_logps(batches, self.reference, self.reference_pipeline)):
                batch.ref_logps = logps
        return batches

    def valid_micro_batches(self, trainer):
        return held_out_batches(self.valid_rows, trainer.job.train.micro_batch_size, self.dp_rank, self.dp)

    # ------------------------------------------------------------------ loss
    def token_counts(self, trainer, batch) -> dict:
        return {"pairs": pair_count(batch.loss_mask, batch.document_ids),
                "chosen_tokens": chosen_mask(batch.loss_mask, batch.document_ids).sum()}

    def objective(self, trainer, out, counts, batch):
        args = self.args
        logps = -out.lm_token_loss
        chosen, rejected = pair_logps(logps, batch.loss_mask, batch.document_ids)
        ref_chosen, ref_rejected = pair_logps(batch.ref_logps, batch.loss_mask, batch.document_ids)
        chosen_tokens, rejected_tokens = pair_token_counts(batch.loss_mask, batch.document_ids)
        present = present_pairs(chosen_tokens, rejected_tokens)
        terms = dpo_terms(chosen, rejected, ref_chosen, ref_rejected, args.beta, args.label_smoothing,
                          args.loss_type, chosen_tokens, rejected_tokens)
        weight = present.float() / counts["pairs"].clamp(min=1)
        loss = (terms.losses * weight).sum()
        # reward_accuracy: the implicit reward ranks chosen first (TRL's rewards/accuracies; 0 while the
        # policy is the reference). ranking_accuracy: the policy's own log-probability does (Chen et
        # al. 2024, "Preference learning algorithms do not learn preference rankings").
        parts = {"loss": loss.detach(),
                 "reward_accuracy": ((terms.chosen_rewards > terms.rejected_rewards) * weight).sum(),
                 "reward_margin": ((terms.chosen_rewards - terms.rejected_rewards) * weight).sum(),
                 "chosen_reward": (terms.chosen_rewards * weight).sum(),
                 "rejected_reward": (terms.rejected_rewards * weight).sum(),
                 "ranking_accuracy": ((chosen > rejected) * weight).sum().detach()}
        if args.sft_weight:
            sft_loss = -(logps * chosen_mask(batch.loss_mask, batch.document_ids)).sum()
            sft_loss = sft_loss / counts["chosen_tokens"].clamp(min=1)
            parts["sft_loss"] = sft_loss.detach()
            loss = loss + args.sft_weight * sft_loss
        return loss, parts


def load_pair_data(job, args, tokenizer_path: str) -> dict:
    """Tokenizer, train / held-out pairs and their packed rows, and the load report."""
    from megajoy.data.preference import load_pairs, pack_pairs
    from megajoy.data.sft import ChatTokenizer, split_held_out

    tokenizer = ChatTokenizer(tokenizer_path, job.model.vocab_size)
    path = sft.data_file(job, args, DEMO_FILE)
    pairs, report = load_pairs(path, tokenizer, job.data.seq_length + 1, args.overlong, args.thinking)
    if not pairs:
        raise ValueError(f"{path}: no preference pairs to train on ({report.summary(path)})")
    train, valid = split_held_out(pairs, min(args.valid_pairs, len(pairs) // 10), job.train.seed)
    return {"tokenizer": tokenizer, "report": report.summary(path), "train": train, "valid": valid,
            "train_rows": pack_pairs(train, job.data.seq_length, tokenizer.pad_id),
            "valid_rows": pack_pairs(valid, job.data.seq_length, tokenizer.pad_id)}


def chosen_conversation(pair: dict) -> dict:
    """The prompt and its chosen response as one conversation (for exact match)."""
    from megajoy.data.preference import prompt_messages, response_messages

    return dict(pair, messages=prompt_messages(pair) + response_messages(pair, "chosen"))


# ------------------------------------------------------------------------------------------ command

def add_arguments(parser) -> None:
    add_config_arguments(parser)
    add_training_flags(parser, without=PRETRAIN_DATA_PATHS)
    group = parser.add_argument_group("DPO")
    group.add_argument("--data", default=None, metavar="FILE.jsonl",
                       help="pairs ({\"prompt\" | \"messages\", \"chosen\", \"rejected\"}); default: the built-in demo pairs")
    group.add_argument("--beta", type=float, default=0.1, help="strength of the KL penalty to the reference")
    group.add_argument("--loss-type", choices=list(LOSSES), default="sigmoid",
                       help="the preference loss, as TRL's loss_type of the same name (default: sigmoid, DPO's)")
    group.add_argument("--label-smoothing", type=float, default=0.0,
                       help="assumed share of flipped preference labels (sigmoid: conservative DPO; robust; "
                            "exo_pair); 0: plain DPO")
    group.add_argument("--sft-weight", type=float, default=0.0,
                       help="weight of a next-token loss on the chosen responses added to the DPO loss")
    group.add_argument("--reference", choices=["cached", "model"], default="cached",
                       help="reference log-probabilities precomputed once from the initial model (cached) or "
                            "from a frozen copy of it run every step (model)")
    group.add_argument("--thinking", choices=["auto", "on", "off"], default="auto",
                       help="template mode: auto = thinking where either response has reasoning_content")
    group.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                       help="pairs whose two sequences exceed --seq-length + 1 tokens together")
    group.add_argument("--valid-pairs", type=int, default=64, help="held out for validation and exact match")
    group.add_argument("--demo-pairs", type=int, default=2000)
    group.add_argument("--exact-match-samples", type=int, default=64,
                       help="held-out prompts scored by greedy exact match before and after (0: off)")


def build_job(args):
    return sft.build_job(args, DEFAULTS, RECIPES)


def run(args) -> int:
    from megajoy.data.demo import preference_pairs
    from megajoy.launch import setup_parallel
    from megajoy.parallel.state import rank0_first
    from megajoy.train.metrics import read_metrics

    if not 0 <= args.label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    check_loss_type(args.loss_type, args.label_smoothing)
    if not 0 < args.beta < float("inf"):
        raise ValueError(f"--beta must be > 0 (0 trains nothing, below 0 the rejected response), got {args.beta}")
    if not 0 <= args.sft_weight < float("inf"):
        raise ValueError(f"--sft-weight must be >= 0, got {args.sft_weight}")
    job = build_job(args)
    pc = setup_parallel(job)
    with rank0_first(pc):
        tokenizer_path = sft.prepare_files(job, args, pc.rank, DEMO_FILE,
                                           lambda: preference_pairs(args.demo_pairs, seed=job.train.seed))
    stage = DpoStage(args)
    trainer = Trainer(job, stage, tokenizer_path, pc)
    before = sft.held_out_exact_match(trainer, stage, args)
    summary = trainer.run()
    after = sft.held_out_exact_match(trainer, stage, args)
    if pc.rank == 0:
        evaluations = [r for r in read_metrics(os.path.join(trainer.out, "metrics.jsonl")) if "val_loss" in r]
        results = {"step": trainer.step, **stage.stats,
                   "ranking_accuracy_before": evaluations[0]["val_ranking_accuracy"] if evaluations else None,
                   "ranking_accuracy_after": summary.get("val_ranking_accuracy"),
                   "exact_match_before": before, "exact_match_after": after,
                   **{k: v for k, v in summary.items() if k.startswith("val_")}}
        with open(os.path.join(trainer.out, "dpo_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(f"megajoy dpo: step {trainer.step}, held-out ranking accuracy "
              f"{results['ranking_accuracy_before']} -> {results['ranking_accuracy_after']}, reward accuracy "
              f"{summary.get('val_reward_accuracy')}, exact match {before} -> {after}; "
              f"checkpoints in {trainer.out}/checkpoints")
    return 0
