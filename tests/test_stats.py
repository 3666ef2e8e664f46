"""`megajoy info` numbers: the published JoyAI-Flash counts, module count = closed form, FLOPs vs torch's counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import random_model, small_config
from megajoy.config import joyai_flash, joyai_slice, tiny
from megajoy.model.stats import closed_form, measure, meta_model


def test_joyai_flash_published_numbers():
    stats = measure(meta_model(joyai_flash()))
    assert abs(stats.total_params / 48.94e9 - 1) < 1e-3
    assert abs(stats.active_params / 2.775e9 - 1) < 1e-3
    assert abs(stats.active_params_with_embeddings / 3.30e9 - 1) < 2e-3
    assert abs(stats.embedding_params / 0.265e9 - 1) < 2e-3 and stats.head_params == stats.embedding_params
    assert abs(stats.mtp_params / 0.079e9 - 1) < 1e-2
    assert stats.kv_cache_bytes_per_token == 46080


CONFIGS = [joyai_flash(), joyai_slice(), tiny(), small_config(q_lora_rank=None, attention_bias=True),
           small_config(tie_word_embeddings=True, first_k_dense_replace=0, n_shared_experts=2,
                        num_nextn_predict_layers=2)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["flash", "slice", "tiny", "full_q_bias", "tied_all_moe_mtp2"])
@pytest.mark.parametrize("seq", [1, 4096])
def test_module_count_equals_closed_form(cfg, seq):
    assert measure(meta_model(cfg), seq_length=seq) == closed_form(cfg, seq_length=seq)


def _grouped_mm_flops(a_shape, b_shape, *args, **kwargs):
    # Every row of a is multiplied by one [K, N] matrix of b: 2 * rows * K * N.
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=None, num_experts_per_tok=3)])
def test_flops_match_torch_flop_counter(kw):
    """torch's FlopCounterMode counts the real forward and backward; it charges attention the full S x S
    score matrix, so compare with the non-causal count."""
    cfg = small_config(**kw)
    model = random_model(cfg).train()
    seq, batch = 32, 2
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops})
    with counter:
        out = model(ids, labels=torch.roll(ids, -1, 1))
        (out.lm_loss + out.mtp_loss).backward()
    stats = measure(model, seq_length=seq, causal=False)
    counted = counter.get_total_flops() / (batch * seq)
    expected = stats.training_flops_per_token(with_mtp=True)
    assert abs(counted / expected - 1) < 1e-9
