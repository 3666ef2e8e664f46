"""The training loop every stage runs. A stage supplies data and a loss (see `Stage`); the loop owns the
rest: gradient accumulation to the global batch, the schedule, clipping, the optimizer and router-bias
steps, validation, logging, checkpoints, resume and SIGTERM."""

import contextlib
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from megajoy.kernels import backend as kernels
from megajoy.model import create_model
from megajoy.model.moe import MoE, Router
from megajoy.model.recompute import Recompute
from megajoy.model.stats import measure, meta_model
from megajoy.optim.master_weights import MasterWeights
from megajoy.optim.qk_clip import apply_qk_clip, track_max_logits
from megajoy.quant.formats import reuse_fake_quant_for
from megajoy.quant.qat import check_groups, quantised_weights, set_qat
from megajoy.optim.schedules import batch_sizes, global_batch_size, learning_rate
from megajoy.parallel.context import ParallelContext
from megajoy.parallel.mappings import all_reduce_no_grad
from megajoy.parallel.optimizer import build_parallel_optimizer
from megajoy.parallel.params import parameter_specs
from megajoy.parallel.pipeline import PipelineRunner, check_micro_batches
from megajoy.train import checkpoint as ckpt
from megajoy.train.metrics import MetricsLog, format_line, plot_losses
from megajoy.train.mfu import peak_flops_per_s, throughput_metrics


class Stage:
    """What a training stage supplies. Losses are normalised by token counts of the whole step, so
    the sum over micro-batches is the global-batch mean whatever the micro-batching or layout."""

    name = "stage"

    def setup(self, trainer: "Trainer") -> None:
        """Prepare data (and anything else) once the model exists."""

    def train_micro_batches(self, trainer: "Trainer", consumed: int, global_batch: int) -> list:
        raise NotImplementedError

    def valid_micro_batches(self, trainer: "Trainer") -> list:
        return []

    def token_counts(self, trainer: "Trainer", batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compute_mtp(self, trainer: "Trainer") -> bool:
        return False

    def step_metrics(self, trainer: "Trainer") -> dict[str, float]:
        """Metrics of the step beyond the objective's (e.g. RL's rollout statistics)."""
        return {}

    def state(self, trainer: "Trainer") -> dict:
        """What a resumed run needs beyond the weights, the step and the data position (JSON values, in
        trainer_state.json). Called on every rank, so it may gather."""
        return {}

    def load_state(self, trainer: "Trainer", state: dict) -> None:
        """Restore what `state` saved, from a checkpoint's trainer state."""

    def evaluate(self, trainer: "Trainer") -> dict[str, float]:
        """Held-out metrics beyond the validation batches' objective (e.g. generation accuracy)."""
        return {}

    def objective(self, trainer: "Trainer", out, counts: dict, batch) -> tuple[torch.Tensor, dict]:
        """From the model's output (CausalLMOutput) for one micro-batch `batch`: (loss to backpropagate,
        its detached contributions to the step's metrics). Runs on the last pipeline stage."""
        raise NotImplementedError


class NextTokenStage(Stage):
    """Next-token loss over the tokens the batch's loss mask selects, plus the MTP loss from
    `mtp_start_iter` on (pretraining, SFT)."""

    def compute_mtp(self, trainer: "Trainer") -> bool:
        return trainer.job.model.num_nextn_predict_layers > 0 and trainer.step >= trainer.job.train.mtp_start_iter

    def token_counts(self, trainer: "Trainer", batch) -> dict:
        from megajoy.model.mtp import mtp_token_count

        counts = {"lm": batch.loss_mask.sum()}
        if self.compute_mtp(trainer):
            counts["mtp"] = mtp_token_count(batch.loss_mask, trainer.job.model.num_nextn_predict_layers)
        return counts

    def objective(self, trainer: "Trainer", out, counts, batch):
        lm = out.lm_loss_sum / counts["lm"].clamp(min=1)
        parts = {"loss": lm.detach()}
        if "mtp" in counts:
            mtp = out.mtp_loss_sum / counts["mtp"].clamp(min=1)
            parts["mtp_loss"] = mtp.detach()
            return lm + trainer.job.model.mtp_loss_weight * mtp, parts
        return lm, parts


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class Trainer:
    def __init__(self, job, stage: Stage, tokenizer_file: str | None, pc: ParallelContext | None = None):
        self.job, self.stage, self.tokenizer_file = job, stage, tokenizer_file
        self.started = time.monotonic()  # what --exit-duration-in-mins counts from
        self.pc = pc or ParallelContext.single(default_device())
        self.device = self.pc.device
        self._check_batch_layout()
        self.out = job.checkpoint.out
        self.bf16 = job.train.bf16 if job.train.bf16 is not None else (
            self.device.type == "cuda" or job.train.params_dtype == "bf16")
        kernels.configure(backend=job.train.kernels, cross_entropy_chunk=job.train.cross_entropy_chunk)
        torch.manual_seed(job.train.seed)
        self.model = create_model(job.model, device=self.device, seed=job.train.seed, pc=self.pc).train()
        self.model.recompute = Recompute.of(job.train)
        self.specs = parameter_specs(self.model, self.pc)
        if job.checkpoint.init:
            ckpt.load_weights(self.model, self.specs, self.pc, job.checkpoint.init)
        self.optimizer = build_parallel_optimizer(self.model, self.pc, job.optimizer,
                                                  job.parallel.use_distributed_optimizer,
                                                  job.parallel.ddp_bucket_size_mb)
        if job.optimizer.qk_clip_tau:
            track_max_logits(self.model, True)
        self.qat_format = self._setup_quantisation()
        self.pipeline = PipelineRunner(self.model, self.pc) if self.pc.size("pp") > 1 else None
        self.checkpoints = ckpt.CheckpointWriter(self.out, self.pc, job.checkpoint.keep_last, job.parallel.async_save)
        self.step, self.consumed = 0, 0
        self._qat_on = False
        self.sigterm_received = False  # set by the signal handler only
        self.stop_requested = False  # the ranks' agreement, from their sigterm_received
        self.routers = [m for m in self.model.modules() if isinstance(m, Router)]
        self.model_stats = measure(meta_model(job.model), job.data.seq_length)
        self.peak_flops = peak_flops_per_s(self.device, self.bf16, job.train.peak_tflops)
        # After the optimizer (which holds the fp32 weights), before the stage (whose reference log-probs
        # must come from the weights the policy computes with).
        self.master_weights = None
        if job.train.params_dtype == "bf16":
            sharded = self.optimizer if self.optimizer.shards_master_weights else None
            self.master_weights = MasterWeights(self.model, torch.bfloat16, sharded)
            if self.pipeline is not None:
                self.pipeline.on_weight_grads = self.master_weights.flush_grads
        stage.setup(self)

    def _setup_quantisation(self):
        """FP8 GEMMs from the start; the QAT format, whose groups are checked now and which is switched on
        at `qat_start_iter` (see `_train_step`)."""
        from megajoy.quant.formats import WeightFormat
        from megajoy.quant.fp8 import Fp8Matmul
        from megajoy.quant.qat import set_fp8

        q = self.job.quant
        if q.fp8 != "off":
            set_fp8(self.model, Fp8Matmul(q.fp8, q.fp8_backend))
        if q.qat is None:
            return None
        fmt = WeightFormat.of(q.qat, q.qat_group)
        check_groups(self.model, fmt, q.qat_modules)
        return fmt

    def _check_batch_layout(self) -> None:
        cfg, dp, pp = self.job.train, self.pc.size("dp_cp"), self.pc.size("pp")
        unit = cfg.micro_batch_size * dp
        for size in batch_sizes(cfg):  # at start-up, not at the first step (of a ramp-up) that cannot run
            if size % unit:
                raise ValueError(f"batch size {size} is not divisible by micro_batch_size x data-parallel size = "
                                 f"{cfg.micro_batch_size} x {dp} = {unit}")
            if pp > 1:
                check_micro_batches(size // unit, pp, self.pc.pipeline_schedule, f"batch size {size}")

    @property
    def is_logging_rank(self) -> bool:
        return self.pc.rank == 0

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        train_iters = self.job.train.train_iters
        resumed = self._maybe_resume()
        self.log = MetricsLog(self.out, resumed, enabled=self.is_logging_rank)
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        bar = tqdm(total=train_iters, initial=self.step, desc=self.stage.name, file=sys.stderr, dynamic_ncols=True,
                   disable=not self.is_logging_rank)
        last = self._evaluate() if resumed is None else {}
        window, saved_at = _Window(), None
        try:
            first_step = self.step
            while self.step < train_iters and not self._stop_agreed(ran_a_step=self.step > first_step):
                window.add(self._train_step())
                bar.update(1)
                last = self._after_step(window, bar) or last
                saved_at = self._maybe_save(saved_at)
                self.checkpoints.poll()
                if self._should_exit():
                    break
        except FloatingPointError:
            self._log_pending(window)  # the losses that led up to it
            self.checkpoints.wait()  # an asynchronous save of an earlier step completes
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            bar.close()
        self._log_pending(window)
        if saved_at != self.step:
            self._save()
        if self.stop_requested and self.is_logging_rank:
            print(f"megajoy {self.stage.name}: stopped after step {self.step} of {train_iters} (SIGTERM, or past "
                  "--exit-duration-in-mins); the checkpoint is saved for --resume", file=sys.stderr)
        self.checkpoints.wait()
        self.log.close()
        if self.job.train.plot:
            plot_losses(self.log.path, os.path.join(self.out, "loss.png"), f"megajoy {self.stage.name}")
        return last

    def _after_step(self, window: "_Window", bar) -> dict | None:
        cfg, record = self.job.train, None
        if self.step % cfg.log_interval == 0 or self.step == cfg.train_iters:
            record = self._log_window(window)
        if self.step % cfg.eval_interval == 0 or self.step == cfg.train_iters:
            record = {**(record or {}), **self._evaluate()}
        return record

    def _log_window(self, window: "_Window") -> dict:
        record = {**window.flush(self.step, self.pc.size("world"), self.peak_flops), "consumed_samples": self.consumed,
                  **self._peak_memory()}
        self.log.write(record)
        if self.is_logging_rank:
            tqdm.write(format_line(record, self.job.train.train_iters), file=sys.stderr)
        return record

    def _log_pending(self, window: "_Window") -> None:
        """Steps a stop (SIGTERM, --exit-interval, a non-finite gradient) cut off before their logging
        interval ended: logged at the last step, as the end of training logs its partial interval. A resumed
        run starts after that step, so they would never be logged otherwise."""
        if window.records:
            self._log_window(window)

    def _peak_memory(self) -> dict:
        """On GPUs, the most memory any rank's allocator has held since the start (Megatron logs the same)."""
        if self.device.type != "cuda":
            return {}
        peak = torch.tensor(float(torch.cuda.max_memory_allocated(self.device)), device=self.device)
        peak = all_reduce_no_grad(peak, self.pc.group("world"), dist.ReduceOp.MAX)
        return {"max_memory_allocated_gib": peak.item() / 2 ** 30}

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
        # SLURM pre-emption: finish the current step, save, exit 0. Only the handler writes this flag: had the
        # vote below written the same one, a signal arriving between the vote's read and its write was lost.
        self.sigterm_received = True

    def _stop_agreed(self, ran_a_step: bool = False) -> bool:
        """Ranks may see SIGTERM at different steps, and their clocks differ: stop when any rank has seen it, or
        has found the run past --exit-duration-in-mins once it ran a step (a resumed run always makes progress)."""
        flag = torch.tensor(float(self.sigterm_received or (ran_a_step and self._out_of_time())), device=self.device)
        self.stop_requested = bool(all_reduce_no_grad(flag, self.pc.group("world"), dist.ReduceOp.MAX).item())
        return self.stop_requested

    def _out_of_time(self) -> bool:
        limit = self.job.train.exit_duration_in_mins
        return limit is not None and time.monotonic() - self.started > 60 * limit

    # ------------------------------------------------------------------ one step
    def _train_step(self) -> dict:
        cfg = self.job.train
        started = time.perf_counter()
        global_batch = global_batch_size(self.consumed, cfg)
        lr = learning_rate(self.step, self.consumed, self.job.optimizer, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        if self.qat_format is not None and not self._qat_on and self.step >= self.job.quant.qat_start_iter:
            set_qat(self.model, self.qat_format, self.job.quant.qat_modules)
            self.prepare_fake_quant(self.qat_format, self.job.quant.qat_modules)
            self._qat_on = True
        micro_batches = self.stage.train_micro_batches(self, self.consumed, global_batch)
        counts = self._step_token_counts(micro_batches)
        self._set_aux_loss_scale(1.0 / (len(micro_batches) * self.pc.size("dp_cp")))
        totals = self._accumulate(micro_batches, counts, backward=True)
        if self.master_weights is not None:
            self.master_weights.flush_grads()
        self.optimizer.reduce_gradients()
        grad_norm = self.optimizer.clip_gradients(self.job.optimizer.clip_grad)
        self._refuse_non_finite(grad_norm, totals)
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.master_weights is not None:
            self.master_weights.copy_to_model()
        clip = self._qk_clip()
        load = self._update_router_biases()
        tokens = sum(b.tokens for b in micro_batches) * self.pc.size("dp_cp")
        flops = tokens * self.model_stats.training_flops_per_token(with_mtp=self.stage.compute_mtp(self))
        self.step += 1
        self.consumed += global_batch
        return {**totals, **self.stage.step_metrics(self), "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                "flops": flops, "global_batch_size": global_batch, "seconds": time.perf_counter() - started,
                **load, **clip}

    def _refuse_non_finite(self, grad_norm: float, totals: dict) -> None:
        """Stop before a NaN or inf gradient reaches the weights (Megatron-LM's check_for_nan_in_loss_and_grad):
        every rank sees the same all-reduced norm, so all stop together, and the checkpoints stay finite."""
        if not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"step {self.step + 1}: the gradient norm is {grad_norm} "
                f"(loss {totals.get('loss', float('nan')):.4g}); "
                "the weights were not updated and the checkpoints saved so far are kept: resume from the last one "
                "with a lower --lr")

    def _qk_clip(self) -> dict:
        tau = self.job.optimizer.qk_clip_tau
        if not tau:
            return {}
        stats = apply_qk_clip(self.model, tau, self.pc.group("dp_cp"), self._scale_weight_rows)
        # Each TP rank holds some heads and each stage some layers: the step's totals cover them all.
        heads = self._reduce_statistic(stats["qk_clip_heads"], ("tp", "pp"))
        peak = self._reduce_statistic(stats["max_attention_logit"], ("tp", "pp"), dist.ReduceOp.MAX)
        return {"qk_clip_heads": int(heads), "max_attention_logit": peak}

    def _reduce_statistic(self, value: float, groups: tuple, op=dist.ReduceOp.SUM) -> float:
        """One per-rank number reduced over the kinds of ranks whose layers or heads differ (`groups`, e.g.
        tensor- and pipeline-parallel); replicas, which hold the same number, are not counted twice."""
        x = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        for name in groups:
            all_reduce_no_grad(x, self.pc.group(name), op)
        return x.item()

    def _scale_weight_rows(self, rows: list) -> None:
        """QK-clip's rescaling, on the fp32 weights wherever the optimizer keeps them."""
        if self.master_weights is not None:
            self.master_weights.scale_rows(rows, self.optimizer)
        else:
            self.optimizer.scale_master_rows(rows)

    def prepare_fake_quant(self, fmt, which: str) -> None:
        """Before `which` weights are first fake-quantised in `fmt`: over ZeRO-1's shards, bf16 weights keep
        their fake-quantised values from then on (MasterWeights.keep_fake_quant)."""
        check_groups(self.model, fmt, which)
        if self.master_weights is not None:
            self.master_weights.keep_fake_quant([p for _, p in quantised_weights(self.model, which)], fmt)

    def full_precision(self):
        """The fp32 weights in the model for the block (see MasterWeights); a no-op in an fp32 run."""
        return self.master_weights.full_precision() if self.master_weights is not None else contextlib.nullcontext()

    def _accumulate(self, micro_batches: list, counts: dict, backward: bool) -> dict[str, float]:
        """Forward (and backward) over the step's micro-batches; return the objective's metrics summed
        over micro-batches and data-parallel ranks."""
        objective = lambda out, batch: self.stage.objective(self, out, counts, batch)  # noqa: E731
        compute_mtp = self.stage.compute_mtp(self)
        with self.autocast(), reuse_fake_quant_for(self.job.quant):  # the weights are fixed for the block
            if self.pipeline is not None:
                parts_sum = self.pipeline.run(micro_batches, objective, compute_mtp, backward)
            else:
                parts_sum = self._run_micro_batches(micro_batches, objective, compute_mtp, backward)
        keys = sorted(parts_sum)
        if not keys:
            return {}
        stacked = all_reduce_no_grad(torch.stack([parts_sum[k] for k in keys]), self.pc.group("dp_cp"))
        return dict(zip(keys, stacked.tolist()))

    def _run_micro_batches(self, micro_batches: list, objective, compute_mtp: bool, backward: bool,
                           model=None) -> dict:
        parts_sum: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            batch = batch.to(self.device)
            out = (model or self.model)(batch.input_ids, batch.position_ids, batch.document_ids, batch.labels,
                                        batch.loss_mask, compute_mtp=compute_mtp, return_logits=False,
                                        padding_mask=batch.padding_mask)
            loss, parts = objective(out, batch)
            if backward:
                loss.backward()
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value.detach().float()
        return parts_sum

    @torch.no_grad()
    def label_logps(self, micro_batches: list, model=None, pipeline=None) -> list[torch.Tensor]:
        """Per micro-batch, the log-probability of each label under `model` (default: the one trained)
        in eval mode, zero where the loss mask is; [B, S] on the CPU. Under pipeline parallelism
        (`pipeline`: the model's runner) only the last stage's ranks get them, the others zeros."""
        model = model or self.model
        pipeline = pipeline or (self.pipeline if model is self.model else None)
        found = []

        def collect(out, batch):
            found.append((-out.lm_token_loss * batch.loss_mask).cpu())
            return out.lm_loss_sum * 0, {}

        was_training = model.training
        model.eval()
        try:
            with self.autocast():
                if pipeline is not None:
                    pipeline.run(micro_batches, collect, False, backward=False)
                else:
                    self._run_micro_batches(micro_batches, collect, False, False, model)
        finally:
            model.train(was_training)
        return found or [torch.zeros_like(b.loss_mask) for b in micro_batches]

    def _step_token_counts(self, micro_batches: list) -> dict:
        counts: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            for key, value in self.stage.token_counts(self, batch).items():
                counts[key] = counts.get(key, 0) + value.to(self.device, torch.float32)
        for value in counts.values():
            all_reduce_no_grad(value, self.pc.group("dp_cp"))
        return counts

    def autocast(self):
        """The run's compute precision for a block of forwards (and backwards): bf16 autocast with --bf16,
        each weight cast once for the block (autocast caches its own casts; the experts' grouped GEMMs
        cast theirs through cast_as_autocast)."""
        return kernels.bf16_autocast(self.device.type) if self.bf16 else contextlib.nullcontext()

    def _set_aux_loss_scale(self, scale: float) -> None:
        for module in self.model.modules():
            if isinstance(module, MoE):
                module.aux_loss_scale = scale

    def _update_router_biases(self) -> dict:
        """Bias update from the step's load (every micro-batch), then reset the counters. The metrics cover
        every stage's routers (a stage may have none)."""
        ratios = []
        for router in self.routers:
            load = all_reduce_no_grad(router.expert_load.float(), self.pc.group("stage"))
            ratios.append((load.max() / load.mean().clamp(min=1e-9)).item())
            if not self.job.train.freeze_router_bias and self.job.model.topk_method == "noaux_tc":  # greedy: unused
                router.update_bias(load, self.job.train.router_bias_update_rate)
            router.expert_load.zero_()
        count = self._reduce_statistic(len(ratios), ("pp",))  # a stage's ranks hold the same loads
        if not count:
            return {}
        return {"expert_load_max_mean": self._reduce_statistic(sum(ratios), ("pp",)) / count,
                "expert_load_max_mean_worst": self._reduce_statistic(max(ratios, default=0.0), ("pp",),
                                                                     dist.ReduceOp.MAX)}

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def _evaluate(self) -> dict:
        if not self.job.train.eval_iters:  # off, as in Megatron-LM; also for stages that score a whole held-out set
            return {}
        batches = self.stage.valid_micro_batches(self)
        totals = {}
        if batches:
            self.model.eval()
            totals = self._accumulate(batches, self._step_token_counts(batches), backward=False)
            self.model.train()
        totals.update(self.stage.evaluate(self))
        if not totals:
            return {}
        record = {"step": self.step, **{f"val_{k}": v for k, v in totals.items()}}
        self.log.write(record)
        if self.is_logging_rank:
            tqdm.write(format_line(record, self.job.train.train_iters), file=sys.stderr)
        return record

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict:
        return {"consumed_samples": self.consumed, "stage": self.stage.name, **self.stage.state(self)}

    def _save(self) -> None:
        """Every rank stages its shards and writes them (in the background with async saves)."""
        with self.full_precision():
            self.checkpoints.save(self.step, self.model, self.optimizer, self.specs, self.job, self.trainer_state(),
                                  self.tokenizer_file)

    def _maybe_resume(self) -> int | None:
        if self.is_logging_rank:
            partial = ckpt.remove_partial_saves(self.out)
            if partial:
                print(f"megajoy: removed incomplete checkpoint(s) {partial} left by an interrupted save",
                      file=sys.stderr)
        if dist.is_initialized():
            dist.barrier()
        if not self.job.checkpoint.resume:
            return None
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt.checkpoints_dir(self.out)}")
        with self.full_precision():
            state = ckpt.load_checkpoint(path, self.model, self.optimizer, self.specs, self.pc, self.stage.name)
            self.optimizer.refresh_from_params()
        self.step, self.consumed = state["step"], state["consumed_samples"]
        self.stage.load_state(self, state)
        if self.is_logging_rank:
            print(f"megajoy: resumed from {path} (step {self.step})", file=sys.stderr)
        return self.step


class _Window:
    """Sums per-step records between log lines."""

    def __init__(self):
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        self.records.append(record)

    def flush(self, step: int, devices: int, peak_flops: float | None) -> dict:
        records, self.records = self.records, []
        tokens, seconds = sum(r["tokens"] for r in records), sum(r["seconds"] for r in records)
        last = records[-1]
        out = {"step": step, "tokens_per_s": tokens / max(seconds, 1e-9), "lr": last["lr"],
               "global_batch_size": last["global_batch_size"],
               "grad_norm": sum(r["grad_norm"] for r in records) / len(records),
               **throughput_metrics(sum(r["flops"] for r in records), seconds, devices, peak_flops)}
        for key in dict.fromkeys(k for r in records for k in r):  # MTP may switch on inside the window
            if key not in ("tokens", "seconds", "flops", *out):
                having = [r[key] for r in records if key in r]
                out[key] = sum(having) / len(having)
        return out
