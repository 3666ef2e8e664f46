"""megajoy's forward equals transformers' DeepseekV3ForCausalLM on the same weights (fp32)."""

import zlib

import pytest
import torch

from helpers import hf_reference, random_model, rel_err, small_config

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
YARN_V2_LITE = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8, "beta_fast": 32,
                "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

CONFIGS = {
    "base": dict(),
    "no_norm_topk_scale_1.7": dict(norm_topk_prob=False, routed_scaling_factor=1.7),
    "yarn": dict(rope_scaling=YARN),
    "yarn_mscale_0.707": dict(rope_scaling=YARN_V2_LITE, routed_scaling_factor=1.0),
    # transformers' optional YaRN keys: an explicit cos/sin amplitude, and the ramp's ends left fractional
    # (with 256 original positions they fall between whole rotary dimensions)
    "yarn_attention_factor": dict(rope_scaling={**YARN, "attention_factor": 0.8}),
    "yarn_untruncated": dict(rope_scaling={**YARN, "original_max_position_embeddings": 256, "truncate": False}),
    "two_dense_two_shared_full_q": dict(first_k_dense_replace=2, num_hidden_layers=4, n_shared_experts=2,
                                        q_lora_rank=None),
    "group_limited": dict(n_group=4, topk_group=2, num_experts_per_tok=3),
    # greedy picks experts without the (nonzero) bias, which transformers always adds: exported as zero
    "greedy_group_limited": dict(topk_method="greedy", n_group=4, topk_group=2, num_experts_per_tok=3),
    "attention_bias_no_mtp": dict(attention_bias=True, num_nextn_predict_layers=0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    cfg = small_config(**CONFIGS[name])
    model = random_model(cfg, seed=zlib.crc32(name.encode()) % 1000)  # str hash() changes every run
    hf, info = hf_reference(model, str(tmp_path / "hf"))
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["mismatched_keys"]
    ids = torch.randint(0, cfg.vocab_size, (2, 40))  # 40 > YaRN's original 16 / 8 positions
    with torch.no_grad():
        ours = model(ids).logits
        ref = hf(ids).logits
    assert ours.shape == ref.shape == (2, 40, cfg.vocab_size)
    assert rel_err(ours, ref) <= 1e-4


def test_every_exported_weight_is_used_by_transformers(tmp_path):
    """Nothing megajoy writes for the main model is ignored by transformers (only the MTP layer is)."""
    cfg = small_config()
    _, info = hf_reference(random_model(cfg), str(tmp_path / "hf"))
    unexpected = set(info["unexpected_keys"])
    assert unexpected and all(k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in unexpected)


def test_attention_sees_bf16_keys_under_autocast(monkeypatch):
    """Under bf16 autocast over fp32 weights, MLA's norms' fp32 outputs are cast once where they leave
    the norm, as the GEMMs reading them would cast them: queries, every head's key and the values reach
    attention in bf16 (the fp32 latent made the rope key, and with it all keys, fp32, which attention
    then cast back), with the same logits to the bit as when the norms' outputs stayed fp32."""
    import megajoy.model.mla as mla_module

    model = random_model(small_config())
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    seen = []
    attend = mla_module.MLA._attend
    monkeypatch.setattr(mla_module.MLA, "_attend", lambda self, q, k, kv, seq: (
        seen.append((q.dtype, k.dtype, kv.dtype)), attend(self, q, k, kv, seq))[1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cast = model(ids).logits
        assert set(seen) == {(torch.bfloat16,) * 3}
        monkeypatch.setattr(mla_module, "cast_as_autocast", lambda t: t)  # the norms' outputs left fp32
        uncast = model(ids).logits
    assert torch.equal(cast, uncast)


def test_loss_with_ignored_labels_matches_transformers(tmp_path):
    """Labels of -100 (Hugging Face's ignore_index) leave those positions out of the loss and its token count,
    MTP on as well (before, its input embedding read -100 and raised): the mean loss is transformers'."""
    cfg = small_config()
    model = random_model(cfg, seed=5)
    hf, _ = hf_reference(model, str(tmp_path / "hf"))
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    hf_labels = ids.clone()
    hf_labels[0, :7] = -100  # a prompt
    hf_labels[1, 15:] = -100  # padding
    labels = torch.cat([hf_labels[:, 1:], torch.full((2, 1), -100)], dim=1)  # megajoy's labels are shifted
    with torch.no_grad():
        out = model(ids, labels=labels)
        ref = hf(ids, labels=hf_labels).loss
    assert out.lm_tokens == 17 + 14  # row 0 predicts tokens 7 to 23, row 1 tokens 1 to 14
    assert abs(out.lm_loss_sum / out.lm_tokens - ref) <= 1e-5 * ref
    assert out.mtp_tokens == 16 + 13  # depth 1 needs the next position trained as well
