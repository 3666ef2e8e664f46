"""The training loop every stage runs. A stage supplies data and a loss (see `Stage`); the loop owns the
rest: gradient accumulation to the global batch, the schedule, clipping, the optimizer and router-bias
steps, validation, logging, checkpoints, resume and SIGTERM."""

import contextlib
import os
import signal
import sys
import time

import torch
from tqdm import tqdm

from megajoy.model import create_model
from megajoy.model.moe import MoE, Router
from megajoy.optim import build_optimizer
from megajoy.optim.schedules import global_batch_size, learning_rate
from megajoy.train import checkpoint as ckpt
from megajoy.train.metrics import MetricsLog, format_line, plot_losses


class Stage:
    """What a training stage supplies. Losses are normalised by token counts of the whole step, so
    the sum over micro-batches is the global-batch mean whatever the micro-batching."""

    name = "stage"

    def setup(self, trainer: "Trainer") -> None:
        """Prepare data (and anything else) once the model exists."""

    def train_micro_batches(self, trainer: "Trainer", consumed: int, global_batch: int) -> list:
        raise NotImplementedError

    def valid_micro_batches(self, trainer: "Trainer") -> list:
        return []

    def token_counts(self, trainer: "Trainer", batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, trainer: "Trainer", batch, counts: dict) -> tuple[torch.Tensor, dict]:
        """(loss to backpropagate, detached per-micro-batch contributions to the step's metrics)."""
        raise NotImplementedError


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class Trainer:
    def __init__(self, job, stage: Stage, tokenizer_file: str | None):
        self.job, self.stage, self.tokenizer_file = job, stage, tokenizer_file
        self.out = job.checkpoint.out
        self.device = default_device()
        self.bf16 = job.train.bf16 if job.train.bf16 is not None else self.device.type == "cuda"
        torch.manual_seed(job.train.seed)
        self.model = create_model(job.model, device=self.device, seed=job.train.seed).train()
        if job.checkpoint.init:
            self._load_init_weights(job.checkpoint.init)
        self.optimizer = build_optimizer(self.model, job.optimizer)
        self.step, self.consumed = 0, 0
        self.stop_requested = False
        self.routers = [m for m in self.model.modules() if isinstance(m, Router)]
        stage.setup(self)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        train_iters = self.job.train.train_iters
        resumed = self._maybe_resume()
        self.log = MetricsLog(self.out, resumed)
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        bar = tqdm(total=train_iters, initial=self.step, desc=self.stage.name, file=sys.stderr, dynamic_ncols=True)
        last = self._evaluate() if resumed is None else {}
        window, saved_at = _Window(), None
        try:
            while self.step < train_iters and not self.stop_requested:
                window.add(self._train_step())
                bar.update(1)
                last = self._after_step(window, bar) or last
                saved_at = self._maybe_save(saved_at)
                if self._should_exit():
                    break
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            bar.close()
        if saved_at != self.step:
            self._save()
        self.log.close()
        if self.job.train.plot:
            plot_losses(self.log.path, os.path.join(self.out, "loss.png"), f"megajoy {self.stage.name}")
        return last

    def _after_step(self, window: "_Window", bar) -> dict | None:
        cfg, record = self.job.train, None
        if self.step % cfg.log_interval == 0 or self.step == cfg.train_iters:
            record = window.flush(self.step)
            self.log.write(record)
            bar.write(format_line(record, cfg.train_iters))
        if self.step % cfg.eval_interval == 0 or self.step == cfg.train_iters:
            record = {**(record or {}), **self._evaluate()}
        return record

    def _maybe_save(self, saved_at: int | None) -> int | None:
        interval = self.job.checkpoint.save_interval
        if (interval and self.step % interval == 0) or self.stop_requested or self._should_exit():
            self._save()
            return self.step
        return saved_at

    def _should_exit(self) -> bool:
        interval = getattr(self.job.train, "exit_interval", None)
        return bool(interval) and self.step % interval == 0 and self.step < self.job.train.train_iters

    def _on_sigterm(self, signum, frame) -> None:
        # SLURM pre-emption: finish the current step, save, exit 0.
        self.stop_requested = True

    # ------------------------------------------------------------------ one step
    def _train_step(self) -> dict:
        cfg = self.job.train
        started = time.perf_counter()
        global_batch = global_batch_size(self.consumed, cfg)
        lr = learning_rate(self.step, self.job.optimizer, cfg.train_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        micro_batches = self.stage.train_micro_batches(self, self.consumed, global_batch)
        counts = self._step_token_counts(micro_batches)
        self._set_aux_loss_scale(1.0 / len(micro_batches))
        totals: dict[str, float] = {}
        for batch in micro_batches:
            with self._autocast():
                loss, parts = self.stage.loss(self, batch.to(self.device), counts)
            loss.backward()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        load = self._update_router_biases()
        self.step += 1
        self.consumed += global_batch
        tokens = sum(b.tokens for b in micro_batches)
        return {**totals, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                "seconds": time.perf_counter() - started, **load}

    def _step_token_counts(self, micro_batches: list) -> dict:
        counts: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            for key, value in self.stage.token_counts(self, batch).items():
                counts[key] = counts.get(key, 0) + value.to(self.device, torch.float32)
        return counts

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _set_aux_loss_scale(self, scale: float) -> None:
        for module in self.model.modules():
            if isinstance(module, MoE):
                module.aux_loss_scale = scale

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.job.optimizer.clip_grad or float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _update_router_biases(self) -> dict:
        """Bias update from the step's load (every micro-batch), then reset the counters."""
        if not self.routers:
            return {}
        ratios = []
        for router in self.routers:
            load = router.expert_load.float()
            ratios.append((load.max() / load.mean().clamp(min=1e-9)).item())
            if not self.job.train.freeze_router_bias:
                router.update_bias(load, self.job.train.router_bias_update_rate)
            router.expert_load.zero_()
        return {"expert_load_max_mean": sum(ratios) / len(ratios), "expert_load_max_mean_worst": max(ratios)}

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def _evaluate(self) -> dict:
        batches = self.stage.valid_micro_batches(self)
        if not batches:
            return {}
        self.model.eval()
        counts = self._step_token_counts(batches)
        totals: dict[str, float] = {}
        for batch in batches:
            with self._autocast():
                _, parts = self.stage.loss(self, batch.to(self.device), counts)
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        self.model.train()
        record = {"step": self.step, **{f"val_{k}": v for k, v in totals.items()}}
        self.log.write(record)
        tqdm.write(format_line(record, self.job.train.train_iters), file=sys.stderr)
        return record

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict:
        return {"consumed_samples": self.consumed, "stage": self.stage.name}

    def _save(self) -> None:
        ckpt.save_checkpoint(self.out, self.step, self.job, self.model, self.optimizer, self.trainer_state(),
                             self.tokenizer_file, self.job.checkpoint.keep_last)

    def _maybe_resume(self) -> int | None:
        partial = ckpt.remove_partial_saves(self.out)
        if partial:
            print(f"megajoy: removed incomplete checkpoint(s) {partial} left by an interrupted save", file=sys.stderr)
        if not self.job.checkpoint.resume:
            return None
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt.checkpoints_dir(self.out)}")
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.step, self.consumed = state["step"], state["consumed_samples"]
        print(f"megajoy: resumed from {path} (step {self.step})", file=sys.stderr)
        return self.step

    def _load_init_weights(self, path: str) -> None:
        from megajoy.ckpt.native import load_model_dir, load_state_checked

        checkpoint = ckpt.latest_checkpoint(path) or path
        _, state, _ = load_model_dir(checkpoint)
        load_state_checked(self.model, state, checkpoint)


class _Window:
    """Sums per-step records between log lines."""

    def __init__(self):
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        self.records.append(record)

    def flush(self, step: int) -> dict:
        records, self.records = self.records, []
        tokens, seconds = sum(r["tokens"] for r in records), sum(r["seconds"] for r in records)
        last = records[-1]
        out = {"step": step, "tokens_per_s": tokens / max(seconds, 1e-9), "lr": last["lr"],
               "grad_norm": sum(r["grad_norm"] for r in records) / len(records)}
        for key in last:
            if key not in ("tokens", "seconds", "lr", "grad_norm"):
                out[key] = sum(r[key] for r in records) / len(records)
        return out
