"""FP8 training behind one GEMM interface (`Fp8Matmul.linear` / `.grouped`), for the projections of the
attention blocks, dense FFNs and experts (the embedding, output head and router stay in full precision,
as DeepSeek-V3 keeps them).

Recipes:
  tensorwise  one scale per tensor (per expert for expert weights); e4m3 for activations and weights,
              e5m2 for gradients
  blockwise   DeepSeek-V3's: e4m3 everywhere, one scale per 1 x 128 tile of activations and gradients
              and per 128 x 128 block of weights
The forward GEMM multiplies FP8 operands; so do the input- and weight-gradient GEMMs (the incoming
gradient is rounded through FP8 too, and the saved operands are the FP8-rounded ones). Back-ends:
  emulate  rounds through torch's float8 dtypes with those scales and multiplies the dequantised operands
           in the GEMM's precision: the forward equals torch._scaled_mm on CPU bit for bit (tested)
  torch    torch._scaled_mm for dense projections on a GPU with FP8 units (Ada / Hopper), tensorwise
  te       Transformer Engine's fp8_autocast around te.pytorch.Linear for dense projections
Experts run the emulated rounding around the grouped GEMM on every back-end (a fused FP8 grouped GEMM
belongs to the GPU kernels).

Under tensor parallelism a tensorwise scale covers the whole tensor, not the rank's shard: the maxima of
sharded operands (every weight, a row-parallel input, a column-parallel output's gradient) are all-reduced
over the group, as Transformer Engine reduces amax over it, so the numbers do not depend on the layout.
Blockwise tiles must not straddle shards: `megajoy.quant.qat.set_fp8` refuses a layout where they would.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megajoy.kernels.grouped_gemm import grouped_mm
from megajoy.parallel.mappings import all_reduce_no_grad, group_size

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
TILE = 128
RECIPES = ("tensorwise", "blockwise")
BACKENDS = ("torch", "te", "emulate")


def quantize(x: torch.Tensor, dtype: torch.dtype, blockwise: bool, block: tuple[int, int] = (1, TILE),
             batch_dims: int = 0, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8, scale) with x8 = (x / scale) in `dtype`. Tensorwise: one scale per tensor (per slice of the
    first `batch_dims` dims), over the shards of the tensor-parallel `group` when x is one. Blockwise: one
    per `block` = (rows, cols) tile of the last two dims, the tensor zero-padded to whole tiles (x8 keeps
    the padding)."""
    fmax = torch.finfo(dtype).max
    x = x.float()
    if not blockwise:
        dims = tuple(range(batch_dims, x.dim()))
        peak = all_reduce_no_grad(_peak(x, dims), group, dist.ReduceOp.MAX)
        scale = (peak / fmax).clamp(min=1e-12)
        return (x / scale).to(dtype), scale
    rows, cols = block
    # Edge tiles that do not fill a block are zero-padded (DeepSeek-V3 stores ceil(n / 128) scales too).
    x = F.pad(x, (0, -x.shape[-1] % cols, 0, -x.shape[-2] % rows))
    tiles = x.unflatten(-1, (-1, cols)).unflatten(-3, (-1, rows))  # [..., R/r, r, C/c, c]
    scale = (tiles.abs().amax(dim=(-3, -1), keepdim=True) / fmax).clamp(min=1e-12)
    return (tiles / scale).to(dtype), scale


def _peak(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """max |x| over `dims`, kept; 0 for an empty tensor (an expert-parallel rank that received no tokens),
    where amax has nothing to reduce and raises."""
    if x.numel() == 0:
        return x.new_zeros([1 if d in dims else n for d, n in enumerate(x.shape)])
    return x.abs().amax(dim=dims, keepdim=True)


def fp8_round(x: torch.Tensor, dtype: torch.dtype, blockwise: bool, block=(1, TILE), batch_dims: int = 0,
              group=None):
    """x as an FP8 GEMM sees it: quantised, then dequantised (in fp32)."""
    x8, scale = quantize(x, dtype, blockwise, block, batch_dims, group)
    full = x8.float() * scale
    if not blockwise:
        return full
    return full.flatten(-4, -3).flatten(-2)[..., :x.shape[-2], :x.shape[-1]]


class _Round(torch.autograd.Function):
    """Forward: round through FP8. Backward: the gradient passes straight through."""

    @staticmethod
    def forward(ctx, x, dtype, blockwise, block, batch_dims, group=None):
        return fp8_round(x, dtype, blockwise, block, batch_dims, group).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None


class _RoundGradient(torch.autograd.Function):
    """Forward: identity. Backward: the incoming gradient rounded through FP8."""

    @staticmethod
    def forward(ctx, y, dtype, blockwise, group=None):
        ctx.dtype, ctx.blockwise, ctx.group = dtype, blockwise, group
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        flat = grad.reshape(-1, grad.shape[-1])
        rounded = fp8_round(flat, ctx.dtype, ctx.blockwise, group=ctx.group)
        return rounded.reshape(grad.shape).to(grad.dtype), None, None, None


class Fp8Matmul:
    """The GEMM back-end a projection calls when FP8 is on (ProjectionHooks.matmul, GroupedExperts.matmul)."""

    def __init__(self, recipe: str, backend: str):
        if recipe not in RECIPES:
            raise ValueError(f"--fp8 {recipe!r} must be off, tensorwise or blockwise")
        check_backend(backend)
        if backend == "torch" and recipe == "blockwise":
            raise ValueError("--fp8 blockwise with --fp8-backend torch is not implemented (its block-scaled "
                             "_scaled_mm needs a Hopper GPU to validate); use --fp8-backend emulate or te")
        self.recipe, self.backend, self.blockwise = recipe, backend, recipe == "blockwise"
        self.grad_dtype = E4M3 if self.blockwise else E5M2
        self._te_modules: dict = {}

    def _activation(self, x, group=None):
        flat = x.reshape(-1, x.shape[-1])
        return _Round.apply(flat, E4M3, self.blockwise, (1, TILE), 0, group).reshape(x.shape)

    def linear(self, x: torch.Tensor, w: torch.Tensor, group=None, tp_dim: int = 0) -> torch.Tensor:
        """x W^T for a projection whose weight is split over the tensor-parallel `group` along `tp_dim`
        (0: column-parallel, output features; 1: row-parallel, input features)."""
        if self.backend == "te":
            return self._te_linear(x, w)
        if self.blockwise or group_size(group) == 1:
            group = None
        x_group, grad_group = (group, None) if tp_dim == 1 else (None, group)
        if self.backend == "torch":
            return _ScaledMmLinear.apply(x, w, self.grad_dtype, x_group, group, grad_group)
        w = _Round.apply(w, E4M3, self.blockwise, (TILE, TILE), 0, group)
        y = F.linear(self._activation(x, x_group), w)
        return _RoundGradient.apply(y, self.grad_dtype, self.blockwise, grad_group)

    def grouped(self, x_TK: torch.Tensor, w_EKN: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Experts: FP8 operands with per-expert weight scales (or 128 x 128 blocks) around the grouped GEMM."""
        w = _Round.apply(w_EKN, E4M3, self.blockwise, (TILE, TILE), 1)
        y = grouped_mm(self._activation(x_TK), w, tokens_per_expert)
        return _RoundGradient.apply(y, self.grad_dtype, self.blockwise)

    def _te_linear(self, x, w):
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe as te_recipe

        module = self._te_modules.get(id(w))
        if module is None:
            module = te.Linear(w.shape[1], w.shape[0], bias=False, params_dtype=w.dtype, device=w.device)
            self._te_modules[id(w)] = module
        module.weight = w if isinstance(w, torch.nn.Parameter) else torch.nn.Parameter(w)
        fp8_recipe = te_recipe.Float8BlockScaling() if self.blockwise else te_recipe.DelayedScaling()
        with te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe):
            return module(x)


class _ScaledMmLinear(torch.autograd.Function):
    """Tensorwise FP8 GEMMs through torch._scaled_mm (GPU), bf16 outputs."""

    @staticmethod
    def forward(ctx, x, w, grad_dtype, x_group=None, w_group=None, grad_group=None):
        ctx.grad_dtype, ctx.grad_group = grad_dtype, grad_group
        x8, sx = quantize(x.reshape(-1, x.shape[-1]), E4M3, False, group=x_group)
        w8, sw = quantize(w, E4M3, False, group=w_group)
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.shape = x.shape
        y = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)
        return y.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x8, sx, w8, sw = ctx.saved_tensors
        g8, sg = quantize(grad.reshape(-1, grad.shape[-1]), ctx.grad_dtype, False, group=ctx.grad_group)
        # _scaled_mm wants its second operand column-major: pass transposed contiguous copies.
        dx = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=sg, scale_b=sw, out_dtype=torch.bfloat16)
        # The weight gradient's inner dimension is the token count, which _scaled_mm wants a multiple of
        # 16: zero rows (FP8 zeros) added to both operands change nothing.
        pad = -g8.shape[0] % 16
        g8_t = torch.nn.functional.pad(g8.view(torch.uint8), (0, 0, 0, pad)).view(g8.dtype).t().contiguous()
        x8_p = torch.nn.functional.pad(x8.view(torch.uint8), (0, 0, 0, pad)).view(x8.dtype)
        dw = torch._scaled_mm(g8_t, x8_p.t().contiguous().t(), scale_a=sg, scale_b=sx, out_dtype=torch.bfloat16)
        return dx.reshape(ctx.shape).to(grad.dtype), dw.to(grad.dtype), None, None, None, None


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"--fp8-backend {backend!r} must be one of {BACKENDS}")
    if backend == "torch" and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        raise ValueError("--fp8-backend torch needs a CUDA GPU with FP8 units (Ada or Hopper); "
                         "use --fp8-backend emulate on this machine")
    if backend == "te":
        try:
            import transformer_engine.pytorch  # noqa: F401
        except ImportError:
            raise ValueError("--fp8-backend te needs Transformer Engine, which is not installed "
                             "(pip install 'transformer-engine[pytorch]' on a CUDA machine)") from None
