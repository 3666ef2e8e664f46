"""The dense multi-token-prediction (MTP, DeepSeek-V3 "NextN") module.

For position i at depth k: h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i)]), one dense decoder layer,
then the module's own final norm (`shared_head.norm`); the output head and the embedding are the main
model's. The concatenation order (embedding first) and feeding the main model's *normed* final hidden
state follow the released weights' consumers (Hugging Face's MtpModel, vLLM, Megatron-Core).
"""

import torch
from torch import nn

from megajoy.config import ModelConfig
from megajoy.model.norm import RMSNorm
from megajoy.parallel.layers import ColumnParallelLinear


class MTPLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, decoder_layer: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = ColumnParallelLinear(2 * cfg.hidden_size, cfg.hidden_size)
        self.decoder = decoder_layer
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_BSD: torch.Tensor, next_embeds_BSD: torch.Tensor, seq) -> torch.Tensor:
        x = self.eh_proj(torch.cat((self.enorm(next_embeds_BSD), self.hnorm(h_BSD)), dim=-1))
        return self.norm(self.decoder(x, seq))


def shift_left(t_BS: torch.Tensor, steps: int, fill) -> torch.Tensor:
    """t[:, i + steps] at position i; the last `steps` positions get `fill`."""
    if steps == 0:
        return t_BS
    tail = torch.full_like(t_BS[:, :steps], fill)
    return torch.cat((t_BS[:, steps:], tail), dim=1)


def mtp_loss_mask(loss_mask_BS: torch.Tensor, depth: int) -> torch.Tensor:
    """Depth k trains position i only where the main loss mask is set at i and at each of the k positions
    after it. The chain reads t_{i+1} .. t_{i+k}: a masked position in between (the EOD closing a packed
    document, the next sample's prompt) means its target lies in another document."""
    mask = loss_mask_BS
    for step in range(1, depth + 1):
        mask = mask * shift_left(loss_mask_BS, step, 0.0)
    return mask


def mtp_token_count(loss_mask_BS: torch.Tensor, depths: int) -> torch.Tensor:
    """Tokens the MTP loss averages over: the mean over depths of each depth's masked count."""
    return torch.stack([mtp_loss_mask(loss_mask_BS.float(), k).sum() for k in range(1, depths + 1)]).mean()
