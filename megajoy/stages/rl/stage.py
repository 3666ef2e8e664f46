"""`megajoy rl`: reinforcement learning with verifiable rewards. Every `--updates-per-batch` steps the
policy samples `--rollouts-per-prompt` completions for each of `--prompts-per-step` prompts (latent-cache
generation, optionally under INT4 / Q4_0 / Q8_0 weights), verifiers score them, advantages are normalised
within each prompt's group, and the rollout policy's log-probabilities are recorded; each step is then
one policy update on the whole rollout batch with the chosen loss (FiberPO by default; GRPO, GSPO,
PPO-clip), so every update after a batch's first sees ratios that differ from 1. One trajectory per row.
Each data-parallel rank rolls out its share of the prompts with its share of the model: a tensor-parallel
group, or a pipeline's stages, decode the same prompts together; expert-parallel ranks decode their own
in lockstep."""

import json
import os
import random
import sys

import torch
import torch.distributed as dist

from megajoy.cli import add_config_arguments
from megajoy.config import QAT_FORMATS, QAT_MODULES
from megajoy.data.packing import stack
from megajoy.stages import sft
from megajoy.stages.flags import PRETRAIN_DATA_PATHS, add_training_flags
from megajoy.stages.rl.losses import POLICY_LOSSES, group_advantages, trajectories
from megajoy.train.trainer import Stage, Trainer

DEFAULTS = {"optimizer": {"lr": 1e-4, "min_lr": 1e-4, "lr_warmup_iters": 0, "lr_decay_style": "constant",
                          "weight_decay": 0.0},
            "train": {"train_iters": 80, "micro_batch_size": 16, "eval_interval": 20, "log_interval": 1},
            "checkpoint": {"out": "runs/rl"}}
# JOYAI.md section 5 for the JoyAI presets: learning rate 1e-6 (held constant, as the demo's), one
# trajectory per micro-batch.
RECIPES = {"joyai-flash": {"optimizer": {"lr": 1e-6, "min_lr": 1e-6}, "train": {"micro_batch_size": 1}}}
RECIPES["joyai-slice"] = RECIPES["joyai-flash"]
DEMO_FILE = "demo_rl.jsonl"
# Losses normalised per token of the whole batch; the others per trajectory.
TOKEN_NORMALISED = {"ppo-clip"}


class RlStage(Stage):
    name = "rl"

    def __init__(self, args):
        self.args = args
        self.rows, self.rollout_stats = None, {}

    # ------------------------------------------------------------------ data and rollouts
    def setup(self, trainer: Trainer) -> None:
        from megajoy.data.prompts import load_prompts
        from megajoy.data.sft import ChatTokenizer

        pc, args = trainer.pc, self.args
        if args.prompts_per_step % pc.size("dp"):
            raise ValueError(f"--prompts-per-step {args.prompts_per_step} is not divisible by the {pc.size('dp')} "
                             f"data-parallel ranks")
        if args.rollout_qat:
            trainer.prepare_fake_quant(self._rollout_format(trainer), args.rollout_qat_modules)
        # The policy trained is the one sampled: the rollout log-probabilities and the update take the logits
        # divided by the sampling temperature, as verl and OpenRLHF do.
        trainer.model.loss_temperature = args.temperature
        self.tokenizer = ChatTokenizer(trainer.tokenizer_file, trainer.job.model.vocab_size)
        path = sft.data_file(trainer.job, args, DEMO_FILE)
        prompts, report = load_prompts(path, self.tokenizer, trainer.job.data.seq_length - args.max_new_tokens,
                                       args.thinking)
        if len(prompts) < 2:
            raise ValueError(f"{path}: not enough usable prompts ({report.summary(path)})")
        order = list(range(len(prompts)))
        random.Random(trainer.job.train.seed).shuffle(order)
        held_out = min(args.valid_prompts, len(prompts) // 5)
        self.valid = [prompts[i] for i in order[:held_out]]
        self.train = [prompts[i] for i in order[held_out:]]
        if not args.curriculum and len(self.train) < args.prompts_per_step:  # a step draws distinct prompts
            raise ValueError(f"{path}: {len(self.train)} training prompts ({held_out} held out), fewer than "
                             f"--prompts-per-step {args.prompts_per_step}")
        self.dp_rank, self.dp = pc.coords["dp"], pc.size("dp")
        self.eos = self.tokenizer.tok.token_to_id("<｜end▁of▁sentence｜>")
        self.sampler = self._curriculum(trainer) if args.curriculum else None
        if pc.rank == 0:
            print(f"megajoy rl: {report.summary(path)}; {len(self.train)} for training, {len(self.valid)} held out; "
                  f"policy loss {args.policy_loss}", file=sys.stderr)

    def _curriculum(self, trainer):
        from megajoy.stages.rl.curriculum import CurriculumSampler

        rates = self._pass_rates(trainer, self.train, self.args.curriculum_rollouts)
        return CurriculumSampler(rates, [p.domain for p in self.train], seed=trainer.job.train.seed)

    def _pass_rates(self, trainer, prompts, n: int) -> list[float]:
        """Each prompt's share of n sampled completions that the verifier accepts (all ranks, gathered)."""
        mine = list(range(self.dp_rank, len(prompts), self.dp))
        rewards = torch.zeros(len(prompts), device=trainer.device)
        chunk = max(1, 64 // n)  # prompts per generation batch
        largest_share = -(-len(prompts) // self.dp)
        for start in range(0, largest_share, chunk):  # as many batches on every rank (expert parallelism)
            part = mine[start:start + chunk]
            completions, _ = self._sample(trainer, [prompts[i] for i in part], n, trainer.job.train.seed - 1, part)
            if part:
                scores = torch.tensor(self._rewards([prompts[i] for i in part for _ in range(n)], completions))
                rewards[part] = scores.view(len(part), n).mean(-1).to(trainer.device)
        if self.dp > 1:
            dist.all_reduce(rewards, group=trainer.pc.group("dp"))
        return rewards.tolist()

    def _sample(self, trainer, prompts, n: int, seed: int, indices: list[int] | None = None, greedy: bool = False):
        """(n completions per prompt, the policy's entropy at each of their tokens), decoded in the run's
        compute precision (bf16 autocast with --bf16, each weight cast once per rollout, not per decoding
        step). Sampling (not the greedy held-out evaluation) uses the --rollout-qat weights. `indices`: the
        prompts' places in the set the data-parallel ranks share (default 0, 1, ...); completion r of prompt
        i draws with row id i * n + r (see generate), as one process decoding the whole set would. Under
        expert parallelism a rank without prompts still steps beside its group's others."""
        import contextlib

        from megajoy.model.generate import SamplingParams, generate

        params = SamplingParams(self.args.max_new_tokens, 0.0 if greedy else self.args.temperature,
                                stop_token_ids=(self.eos,), seed=seed)
        entropies = []
        with trainer.autocast(), contextlib.nullcontext() if greedy else self._rollout_weights(trainer):
            row_ids = [i * n + r for i in (range(len(prompts)) if indices is None else indices) for r in range(n)]
            completions = generate(trainer.model, [p.ids for p in prompts for _ in range(n)], params, entropies,
                                   row_ids)
        return completions, entropies

    def _rollout_format(self, trainer):
        from megajoy.quant.formats import WeightFormat

        return WeightFormat.of(self.args.rollout_qat, trainer.job.quant.qat_group)

    def _rollout_weights(self, trainer):
        """Rollouts under quantised weights (--rollout-qat): fake-quant on for generation only."""
        import contextlib

        if not self.args.rollout_qat:
            return contextlib.nullcontext()
        from megajoy.quant.formats import reuse_fake_quant_for
        from megajoy.quant.qat import qat_targets, set_qat

        @contextlib.contextmanager
        def quantised():
            targets = qat_targets(trainer.model, self.args.rollout_qat_modules)
            before = [m.weight_quant for _, m in targets]
            set_qat(trainer.model, self._rollout_format(trainer), self.args.rollout_qat_modules)
            try:
                with reuse_fake_quant_for(trainer.job.quant):  # once per rollout, not per decoding step
                    yield
            finally:
                for (_, m), quant in zip(targets, before):
                    m.weight_quant = quant

        return quantised()

    def _rewards(self, prompts, completions) -> list[float]:
        from megajoy.stages.rl.rewards import reward

        return [reward(self.tokenizer.decode(c), p.answer, p.verifier, p.thinking)
                for p, c in zip(prompts, completions)]

    def _choose_prompts(self, trainer) -> list:
        args, step = self.args, trainer.step
        rng = random.Random(trainer.job.train.seed * 1_000_003 + step)  # the step's own: a resumed run draws the same
        if self.sampler is not None:
            picked = self.sampler.sample(args.prompts_per_step, step / max(trainer.job.train.train_iters - 1, 1), rng)
        else:
            picked = rng.sample(range(len(self.train)), args.prompts_per_step)
        if trainer.pc.size("world") > 1:  # every rank uses rank 0's choice
            box = [picked]
            dist.broadcast_object_list(box, src=0)
            picked = box[0]
        return [self.train[i] for i in picked[self.dp_rank::self.dp]]

    def rollout(self, trainer) -> None:
        from megajoy.data.sft import Sample

        n = self.args.rollouts_per_prompt
        prompts = self._choose_prompts(trainer)
        completions, entropies = self._sample(trainer, prompts, n, trainer.job.train.seed * 1_000_003 + trainer.step,
                                              list(range(self.dp_rank, self.args.prompts_per_step, self.dp)))
        expanded = [p for p in prompts for _ in range(n)]
        rewards = torch.tensor(self._rewards(expanded, completions))
        advantages = group_advantages(rewards.view(len(prompts), n)).flatten()
        samples = [Sample(p.ids + c, [False] * len(p.ids) + [True] * len(c)) for p, c in zip(expanded, completions)]
        rows = self._rows(trainer, samples)
        self._record_rollout_policy(trainer, rows, advantages)
        self.samples, self.advantages = samples, advantages.tolist()
        entropy_sum = sum(sum(e) for e in entropies)
        tokens = sum(len(c) for c in completions)
        totals = torch.tensor([float(rewards.sum()), float(len(completions)), float(tokens), entropy_sum],
                              device=trainer.device)
        if self.dp > 1:
            dist.all_reduce(totals, group=trainer.pc.group("dp"))
        reward_sum, count, tokens, entropy = totals.tolist()
        self.rollout_stats = {"reward": reward_sum / count, "response_length": tokens / count,
                              "entropy": entropy / max(tokens, 1)}
        self.rows = rows

    def _rows(self, trainer, samples) -> list:
        from megajoy.data.sft import packed_row

        # a row's capacity - 1 positions (its inputs), which tensor-parallel ranks split, in a multiple of them
        tp = trainer.pc.tp_size
        capacity = -(-(max(len(s.ids) for s in samples) - 1) // tp) * tp + 1
        return [packed_row([s], capacity, self.tokenizer.pad_id) for s in samples]

    def _record_rollout_policy(self, trainer, rows, advantages) -> None:
        """Set each row's rollout log-probabilities (the training forward's own numerics: autocast and
        cross-entropy path, so the first update sees ratios of exactly 1) and advantages."""
        micro = trainer.job.train.micro_batch_size
        batches = [stack(rows[i:i + micro]) for i in range(0, len(rows), micro)]
        logps = torch.cat(trainer.label_logps(batches))
        for i, row in enumerate(rows):
            row.ref_logps = logps[i:i + 1]
            row.advantages = advantages[i] * row.loss_mask

    def train_micro_batches(self, trainer, consumed, global_batch):
        if self.rows is None or trainer.step % self.args.updates_per_batch == 0:
            self.rollout(trainer)
        micro = trainer.job.train.micro_batch_size
        return [stack(self.rows[i:i + micro]) for i in range(0, len(self.rows), micro)]

    # ------------------------------------------------------------------ resume inside a rollout batch
    def state(self, trainer) -> dict:
        """Saved inside a rollout batch: the batch (every data-parallel rank's rows, as the last pipeline stage
        holds their log-probabilities), so that a resumed run updates on it as the unbroken run does instead of
        rolling out again with a later policy."""
        if self.rows is None or trainer.step % self.args.updates_per_batch == 0:
            return {}
        pc = trainer.pc
        holder = pc.coords["pp"] == pc.last_stage_pp_rank and pc.tp_rank == 0 and pc.coords["cp"] == 0
        mine = (self.dp_rank, [{"ids": s.ids, "trained": s.trained, "advantage": a,
                                "ref_logps": row.ref_logps[0, :len(s.ids) - 1].tolist()}
                               for s, a, row in zip(self.samples, self.advantages, self.rows)]) if holder else None
        shares = [mine]
        if pc.size("world") > 1:
            shares = [None] * pc.size("world")
            dist.all_gather_object(shares, mine, group=pc.group("world"))
        rows = [rows for _, rows in sorted((s for s in shares if s is not None), key=lambda s: s[0])]
        return {"rollout": {"rows": rows, "stats": self.rollout_stats}}

    def load_state(self, trainer, state) -> None:
        from megajoy.data.sft import Sample

        if "rollout" not in state:
            return
        saved, n = state["rollout"]["rows"], self.args.rollouts_per_prompt
        # Prompt j of the batch was rolled out by the saving run's rank j % len(saved): take this rank's prompts.
        mine = [row for j in range(self.dp_rank, self.args.prompts_per_step, self.dp)
                for row in saved[j % len(saved)][j // len(saved) * n:(j // len(saved) + 1) * n]]
        self.samples = [Sample(r["ids"], r["trained"]) for r in mine]
        self.advantages = [r["advantage"] for r in mine]
        self.rows = self._rows(trainer, self.samples)
        for row, saved_row in zip(self.rows, mine):
            logps = torch.tensor(saved_row["ref_logps"], dtype=torch.float32)
            row.ref_logps = torch.nn.functional.pad(logps, (0, row.loss_mask.shape[1] - len(logps)))[None]
            row.advantages = torch.tensor(saved_row["advantage"], dtype=torch.float32) * row.loss_mask
        self.rollout_stats = state["rollout"]["stats"]

    def step_metrics(self, trainer) -> dict:
        return dict(self.rollout_stats)

    def evaluate(self, trainer) -> dict:
        """Greedy accuracy on the held-out prompts, each rank a share."""
        mine = self.valid[self.dp_rank::self.dp]
        hits = sum(self._rewards(mine, self._sample(trainer, mine, 1, seed=0, greedy=True)[0]))
        totals = torch.tensor([hits, float(len(mine))], device=trainer.device)
        if self.dp > 1:
            dist.all_reduce(totals, group=trainer.pc.group("dp"))
        return {"accuracy": (totals[0] / totals[1].clamp(min=1)).item()}

    # ------------------------------------------------------------------ loss
    def token_counts(self, trainer, batch) -> dict:
        mask = batch.loss_mask
        return {"trajectories": trajectories(mask).sum(), "tokens": mask.sum()}

    def objective(self, trainer, out, counts, batch):
        args = self.args
        mask = batch.loss_mask
        log_ratio = (-out.lm_token_loss - batch.ref_logps) * mask
        advantages = (batch.advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        loss, stats = POLICY_LOSSES[args.policy_loss](log_ratio, advantages, mask, **self.loss_options())
        rows, tokens = trajectories(mask).sum(), mask.sum()
        row_share = rows / counts["trajectories"].clamp(min=1)
        token_share = tokens / counts["tokens"].clamp(min=1)
        scale = token_share if args.policy_loss in TOKEN_NORMALISED else row_share
        ratio = (log_ratio.detach().exp() * mask).sum() / counts["tokens"].clamp(min=1)
        parts = {"loss": (loss * scale).detach(), "importance_ratio": ratio}
        for key, value in stats.items():
            share = row_share if key.startswith("regime_") or key == "sequence_clip_fraction" else token_share
            parts[key] = torch.as_tensor(value, device=mask.device) * share
        return loss * scale, parts

    def loss_options(self) -> dict:
        args, loss = self.args, self.args.policy_loss
        if loss == "fiberpo":
            return dict(c_plus=args.fiber_c_plus, c_minus=args.fiber_c_minus, epsilon=args.fiber_epsilon)
        if loss == "gspo":
            return dict(epsilon_low=args.gspo_epsilon_low, epsilon_high=args.gspo_epsilon_high)
        return dict(epsilon=args.clip_epsilon)


# ------------------------------------------------------------------------------------------ command

def add_arguments(parser) -> None:
    add_config_arguments(parser)
    add_training_flags(parser, without=PRETRAIN_DATA_PATHS)
    group = parser.add_argument_group("RL")
    group.add_argument("--data", default=None, metavar="FILE.jsonl",
                       help="prompts ({\"messages\" | \"prompt\", \"answer\", \"verifier\": math|calculator, "
                            "\"domain\"}); default: the built-in demo prompts")
    group.add_argument("--policy-loss", choices=sorted(POLICY_LOSSES), default="fiberpo")
    group.add_argument("--compare", nargs="+", choices=sorted(POLICY_LOSSES), metavar="LOSS",
                       help="run each loss with the same seeds into OUT/LOSS and plot their curves in OUT/compare.png")
    group.add_argument("--fiber-c-plus", type=float, default=0.12, help="FiberPO budget C+ of the positive channel")
    group.add_argument("--fiber-c-minus", type=float, default=0.08, help="FiberPO budget C- of the negative channel")
    group.add_argument("--fiber-epsilon", type=float, default=0.05, help="FiberPO token-level (fiber) clip")
    group.add_argument("--clip-epsilon", type=float, default=0.2, help="GRPO / PPO-clip ratio clip")
    group.add_argument("--gspo-epsilon-low", type=float, default=3e-4)
    group.add_argument("--gspo-epsilon-high", type=float, default=4e-4)
    group.add_argument("--prompts-per-step", type=int, default=8)
    group.add_argument("--rollouts-per-prompt", type=int, default=8)
    group.add_argument("--updates-per-batch", type=int, default=2,
                       help="policy updates (steps) on each rollout batch")
    group.add_argument("--max-new-tokens", type=int, default=40)
    group.add_argument("--temperature", type=float, default=1.0)
    group.add_argument("--rollout-qat", choices=QAT_FORMATS, default=None,
                       help="sample rollouts with fake-quantised weights (the update stays in full precision)")
    group.add_argument("--rollout-qat-modules", choices=QAT_MODULES, default="routed-experts")
    group.add_argument("--curriculum", action="store_true",
                       help="Gaussian pass-rate curriculum over domains (profiles every training prompt first)")
    group.add_argument("--curriculum-rollouts", type=int, default=10)
    group.add_argument("--thinking", choices=["auto", "on", "off"], default="auto")
    group.add_argument("--valid-prompts", type=int, default=64, help="held out for greedy accuracy")
    group.add_argument("--demo-prompts", type=int, default=1000)


def build_job(args, dp: int = 1):
    """One step updates on the whole rollout batch: the global batch is prompts x rollouts; the default
    micro-batch is the largest of at most 16 rows (the demo's; the JoyAI recipe's 1) that divides each rank's
    share."""
    from megajoy.config import with_recipe

    if args.rollouts_per_prompt < 2:
        raise ValueError("--rollouts-per-prompt must be at least 2 (advantages are normalised within a group)")
    if not 0 < args.temperature < float("inf"):
        raise ValueError(f"--temperature must be > 0 (rollouts are sampled), got {args.temperature}")
    for flag, least in (("updates_per_batch", 1), ("max_new_tokens", 1), ("curriculum_rollouts", 1),
                        ("valid_prompts", 0)):
        if getattr(args, flag) < least:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least {least}, got {getattr(args, flag)}")
    # A budget or clip <= 0 inverts the clamp's bounds: every ratio would be clipped to a constant, silently.
    for flag in ("fiber_c_plus", "fiber_c_minus", "fiber_epsilon", "clip_epsilon", "gspo_epsilon_low",
                 "gspo_epsilon_high"):
        if not 0 < getattr(args, flag) < float("inf"):
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    rollouts = args.prompts_per_step * args.rollouts_per_prompt
    per_rank = max(rollouts // dp, 1)
    defaults = with_recipe(DEFAULTS, RECIPES.get(args.preset or "tiny"))
    micro = max(m for m in range(1, min(defaults["train"]["micro_batch_size"], per_rank) + 1) if per_rank % m == 0)
    defaults["train"].update(global_batch_size=rollouts, micro_batch_size=micro)
    job = sft.build_job(args, defaults)
    if job.train.global_batch_size != rollouts:
        raise ValueError(f"--global-batch-size is set by --prompts-per-step x --rollouts-per-prompt = {rollouts}")
    return job


def run(args) -> int:
    from megajoy.data.demo import rl_prompts
    from megajoy.launch import setup_parallel
    from megajoy.parallel.state import rank0_first

    losses = args.compare or [args.policy_loss]
    job = build_job(args)
    pc = setup_parallel(job)
    root = job.checkpoint.out
    results = {}
    for loss in losses:
        args.policy_loss = loss
        job = build_job(args, pc.size("dp"))
        if args.compare:
            job.checkpoint.out = os.path.join(root, loss)
        with rank0_first(pc):
            tokenizer_path = sft.prepare_files(job, args, pc.rank, DEMO_FILE,
                                               lambda: rl_prompts(args.demo_prompts, seed=job.train.seed))
        trainer = Trainer(job, RlStage(args), tokenizer_path, pc)
        summary = trainer.run()
        results[loss] = summarise(trainer.out, trainer.step, loss, summary)
    if pc.rank == 0:
        if job.train.plot and not args.compare:
            plot_runs({losses[0]: os.path.join(root, "metrics.jsonl")}, os.path.join(root, "rl.png"))
        if args.compare:
            plot_runs({loss: os.path.join(root, loss, "metrics.jsonl") for loss in losses},
                      os.path.join(root, "compare.png"))
            with open(os.path.join(root, "compare.json"), "w") as f:
                json.dump(results, f, indent=2)
        for loss, r in results.items():
            print(f"megajoy rl ({loss}): step {r['step']}, held-out accuracy {r['accuracy_before']:.3f} -> "
                  f"{r['accuracy_after']:.3f}; checkpoints in {r['out']}/checkpoints")
    return 0


def summarise(out: str, step: int, loss: str, summary: dict) -> dict:
    from megajoy.train.metrics import read_metrics

    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    evaluations = [r for r in records if "val_accuracy" in r]
    result = {"policy_loss": loss, "step": step, "out": out,
              "accuracy_before": evaluations[0]["val_accuracy"] if evaluations else float("nan"),
              "accuracy_after": summary.get("val_accuracy", evaluations[-1]["val_accuracy"] if evaluations else
                                            float("nan"))}
    if dist.is_initialized() and dist.get_rank() != 0:
        return result
    with open(os.path.join(out, "rl_results.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def plot_runs(metrics: dict[str, str], png: str) -> None:
    """Training reward and held-out accuracy of each run against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megajoy.train.metrics import read_metrics

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, path in metrics.items():
        records = read_metrics(path)
        left.plot(*zip(*[(r["step"], r["reward"]) for r in records if "reward" in r]), label=label)
        right.plot(*zip(*[(r["step"], r["val_accuracy"]) for r in records if "val_accuracy" in r]), marker="o",
                   label=label)
    left.set(xlabel="step", ylabel="mean rollout reward", title="training reward")
    right.set(xlabel="step", ylabel="greedy accuracy", title="held-out accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)

