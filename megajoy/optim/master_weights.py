"""Low-precision model weights over fp32 master weights (Megatron's `--bf16` layout).

The module's parameters are swapped for bf16 copies, which the forward and backward use directly: no
per-micro-batch cast of fp32 weights, no cast of the gradients back. The fp32 tensors the model was
built with stay the source of truth: the optimizer is built on them before the swap, and every
reduction, norm, clip and step runs on them as in an fp32 run. Each bf16 gradient is added into its
master's fp32 `.grad` as soon as autograd has accumulated it (and freed), so micro-batches accumulate
in fp32. After the step the masters are copied into the bf16 weights.

Code that reads or writes weights outside a training step (checkpoints) runs inside `full_precision()`,
which puts the masters back into the modules meanwhile: checkpoints hold the fp32 weights and resume
exactly, at any layout and in either mode. QK-clip's row rescaling goes to the masters through
`scale_rows`, which under ZeRO-1 scales the shards where they are.
"""

import contextlib

import torch
from torch import nn


class MasterWeights:
    """`sharded`: a ZeRO-1 optimizer with `release_full_weights` / `materialize_full_weights` /
    `gather_weights` (DistributedOptimizer, MuonOptimizer), whose shards then are the only masters; the
    whole fp32 tensors keep only their gradients, and are gathered back inside `full_precision()`. Fake
    quantisation, which reads whole masters, then reads values kept for it (`keep_fake_quant`)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16, sharded=None):
        self.model, self.dtype, self.sharded = model, dtype, sharded
        self.whole = False  # inside full_precision()
        self.slots: list[tuple[nn.Module, str, nn.Parameter]] = []  # (module, attribute, master) for every use
        self.compute_of: dict[nn.Parameter, nn.Parameter] = {}  # master -> its low-precision copy
        for module in model.modules():
            for name, master in module._parameters.items():
                if master is None:
                    continue
                if master not in self.compute_of:  # tied weights share one copy
                    self.compute_of[master] = self._make_compute(master)
                self.slots.append((module, name, master))
        self._install(compute=True)
        if sharded is not None:
            self._release()

    def _release(self) -> None:
        self.sharded.release_full_weights(self.compute_of)
        for compute in self.compute_of.values():
            compute.fp32_master = None  # no whole fp32 tensor to fake-quantise from (megajoy.quant.formats)

    def _make_compute(self, master: nn.Parameter) -> nn.Parameter:
        if master.dtype == self.dtype:
            raise ValueError(f"master weights must be fp32, got {master.dtype} (a model built in {self.dtype})")
        compute = nn.Parameter(master.detach().to(self.dtype), requires_grad=master.requires_grad)
        compute.fp32_master = master  # what fake quantisation reads (megajoy.quant.formats)
        if compute.requires_grad:
            compute.register_post_accumulate_grad_hook(lambda p: _move_grad(p, master))
        return compute

    def _install(self, compute: bool) -> None:
        for module, name, master in self.slots:
            module._parameters[name] = self.compute_of[master] if compute else master

    def keep_fake_quant(self, weights: list[nn.Parameter], fmt) -> None:
        """Fake quantisation in `fmt` of these low-precision weights, over sharded masters: each weight keeps
        its fake-quantised values (2 bytes an element in bf16), computed from the fp32 master wherever the
        weights are gathered from it (each step, QK-clip, a checkpoint), instead of a whole fp32 master
        (4 bytes). The values are those quantising the whole master gives. Whole masters need nothing kept."""
        if self.sharded is None:
            return
        copies = {id(c) for c in self.compute_of.values()}
        for weight in weights:
            if id(weight) not in copies:
                raise ValueError(f"keep_fake_quant: a {tuple(weight.shape)} weight that is not one of the model's "
                                 "low-precision copies")
            weight.kept_fake_quant = getattr(weight, "kept_fake_quant", {})
            weight.kept_fake_quant.setdefault(fmt, None)
        self.sharded.gather_weights()

    def flush_grads(self) -> None:
        """Gradients written straight into `.grad` (not through autograd's accumulation, as a zero-bubble
        pipeline's weight pass does) join the masters' here; call before reducing gradients."""
        for master, compute in self.compute_of.items():
            if compute.grad is not None:
                _move_grad(compute, master)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """After an optimizer step (or any change to the masters): refresh the low-precision weights. A
        sharded optimizer's step has written them already."""
        if self.sharded is None:
            masters = list(self.compute_of)
            torch._foreach_copy_([self.compute_of[m] for m in masters], masters)

    def scale_rows(self, rows: list, optimizer) -> None:
        """Multiply rows of weights ((weight, row slice, factor), each weight as the model holds it) on
        their fp32 masters, through the optimizer that keeps them (a sharded one scales its shards), and
        refresh the low-precision copies: QK-clip without gathering whole fp32 weights."""
        master_of = {compute: master for master, compute in self.compute_of.items()}
        optimizer.scale_master_rows([(master_of.get(w, w), span, factor) for w, span, factor in rows])
        self.copy_to_model()

    @contextlib.contextmanager
    def full_precision(self):
        """The fp32 masters in the modules for the block's duration; the copies refreshed afterwards (with
        a sharded optimizer: from its shards, which the block must have refreshed if it changed weights)."""
        if self.whole:  # nested: the outer block restores the copies
            yield
            return
        self.whole = True
        if self.sharded is not None:
            self.sharded.materialize_full_weights()
            for master, compute in self.compute_of.items():
                compute.fp32_master = master
        self._install(compute=False)
        try:
            yield
        finally:
            self._install(compute=True)
            if self.sharded is not None:
                self._release()
            else:
                self.copy_to_model()
            self.whole = False


@torch.no_grad()
def _move_grad(compute: nn.Parameter, master: nn.Parameter) -> None:
    if master.grad is None:
        master.grad = compute.grad.to(master.dtype, copy=True)
    else:
        master.grad.add_(compute.grad)
    compute.grad = None
