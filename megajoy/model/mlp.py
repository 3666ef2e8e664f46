"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used by the dense layers and the MTP layer
(tensor-parallel: gate / up column-parallel, down row-parallel) and as the MoE's shared expert
(replicated: built without a group)."""

import torch
from torch import nn

from megajoy.kernels.swiglu import swiglu
from megajoy.parallel.layers import ColumnParallelLinear, RowParallelLinear, shared_input
from megajoy.parallel.mappings import enter_tp


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, group=None, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sp = group, sequence_parallel
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, group)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, group)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        to_gate, to_up = shared_input(enter_tp(x, self.group, self.sp), self.gate_proj, self.up_proj)
        return self.down_proj.forward_exit(swiglu(self.gate_proj(to_gate), self.up_proj(to_up)), self.sp)
