"""Configs: presets as published, validation messages, YAML and --set overrides."""

import dataclasses

import pytest

from megajoy.config import JobConfig, ModelConfig, joyai_flash, joyai_slice, load_job_config, tiny


def test_joyai_flash_preset_is_the_published_config():
    c = joyai_flash()
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (40, 2048, 32)
    assert (c.q_lora_rank, c.kv_lora_rank) == (1536, 512)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (128, 64, 128)
    assert (c.intermediate_size, c.moe_intermediate_size) == (7168, 768)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts) == (256, 8, 1)
    assert (c.first_k_dense_replace, c.n_group, c.topk_group) == (1, 1, 1)
    assert (c.scoring_func, c.topk_method, c.norm_topk_prob, c.routed_scaling_factor) == ("sigmoid", "noaux_tc", True, 2.5)
    assert (c.vocab_size, c.max_position_embeddings, c.rope_theta, c.rms_norm_eps) == (129280, 131072, 3.2e7, 1e-6)
    assert (c.tie_word_embeddings, c.num_nextn_predict_layers, c.bos_token_id, c.eos_token_id) == (False, 1, 0, 1)
    assert c.rope_scaling is None and c.hidden_act == "silu"
    assert abs(c.softmax_scale - 192 ** -0.5) < 1e-12


def test_small_presets_keep_the_structure():
    for c in (joyai_slice(), tiny()):
        assert c.first_k_dense_replace == 1 and c.num_hidden_layers > 1
        assert c.n_shared_experts == 1 and c.num_nextn_predict_layers == 1
    assert joyai_slice().hidden_size == 2048 and joyai_slice().num_hidden_layers == 4
    assert joyai_slice().n_routed_experts == 64


def test_yarn_softmax_scale_uses_mscale_all_dim():
    c = dataclasses.replace(tiny(), rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                                  "mscale": 1.0, "mscale_all_dim": 1.0})
    import math
    m = 0.1 * math.log(40) + 1
    assert abs(c.softmax_scale - c.qk_head_dim ** -0.5 * m * m) < 1e-12


@pytest.mark.parametrize("kw, message", [
    (dict(n_routed_experts=10, n_group=4), "n_routed_experts=10 is not divisible by n_group=4"),
    (dict(num_experts_per_tok=20), "num_experts_per_tok=20 exceeds n_routed_experts=16"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim=15 must be even"),
    (dict(num_attention_heads=0), "num_attention_heads=0 must be a positive integer"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace=9 must lie in [0, num_hidden_layers=4]"),
    (dict(scoring_func="softmax"), "only 'sigmoid'"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "only 'yarn'"),
    (dict(rope_scaling={"type": "yarn"}), "needs 'factor'"),
    (dict(rope_scaling={"type": "yarn", "factor": None, "original_max_position_embeddings": 64}), "needs 'factor'"),
    (dict(rope_scaling={"type": "yarn", "factor": "4", "original_max_position_embeddings": 64}),
     "rope_scaling.factor='4' must be a number"),
    (dict(rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": "32"}),
     "rope_scaling.beta_fast='32' must be a number"),
    (dict(eos_token_id=5000), "eos_token_id=5000 must lie in [0, vocab_size=4096)"),
])
def test_validation_messages(kw, message):
    with pytest.raises(ValueError) as e:
        dataclasses.replace(tiny(), **kw)
    assert message in str(e.value)


def test_set_overrides_and_yaml(tmp_path):
    job = load_job_config("tiny", None, ["model.hidden_size=96", "model.rms_norm_eps=1e-5",
                                         "model.q_lora_rank=null"])
    assert job.model.hidden_size == 96 and job.model.rms_norm_eps == 1e-5 and job.model.q_lora_rank is None
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_hidden_layers: 6\n  rope_scaling: {type: yarn, factor: 4, "
                    "original_max_position_embeddings: 512}\n")
    job = load_job_config("joyai-slice", str(path), ["model.n_routed_experts=32"])
    assert job.model.num_hidden_layers == 6 and job.model.n_routed_experts == 32
    assert job.model.hidden_size == 2048 and job.model.rope_scaling["factor"] == 4


@pytest.mark.parametrize("overrides, message", [
    (["model.hiden_size=96"], "override model.hiden_size=96: JobConfig.model: unknown ModelConfig field(s) "
                              "['hiden_size']"),
    (["model.hidden_size=big"], "override model.hidden_size=big: JobConfig.model.hidden_size='big' must be an "
                                "integer"),
    (["model.norm_topk_prob=3"], "JobConfig.model.norm_topk_prob=3 must be true or false"),
    (["hidden_size=96"], "expected SECTION.FIELD=VALUE"),
    (["model.num_attention_heads=6", "model.num_hidden_layers=0"],
     "override model.num_hidden_layers=0: JobConfig.model: num_hidden_layers=0 must be a positive integer"),
])
def test_override_errors(overrides, message):
    with pytest.raises(ValueError) as e:
        load_job_config("tiny", None, overrides)
    assert message in str(e.value)


def test_an_error_names_the_layer_that_brought_the_bad_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_routed_experts: 12\n  n_group: 4\n  topk_group: 2\n")
    # The YAML is valid; an override that breaks it is named, not the file.
    with pytest.raises(ValueError) as e:
        load_job_config("tiny", str(path), ["model.n_group=5"])
    assert str(e.value).startswith("override model.n_group=5: JobConfig.model: n_routed_experts=12 is not "
                                   "divisible by n_group=5")
    # An unknown field given by an override is not the file's either.
    with pytest.raises(ValueError, match=r"^override train\.lr=1: JobConfig\.train: unknown TrainConfig"):
        load_job_config("tiny", str(path), ["train.lr=1"])
    # A file's bad value names the file, before and after the overrides that leave it bad.
    path.write_text("model:\n  n_routed_experts: 10\n  n_group: 4\n")
    with pytest.raises(ValueError) as e:
        load_job_config("tiny", str(path), ["model.hidden_size=96"])
    assert str(e.value) == f"{path}: JobConfig.model: n_routed_experts=10 is not divisible by n_group=4"
    # An override may repair the file (no error); a later one that breaks something else is named.
    assert load_job_config("tiny", str(path), ["model.n_group=2"]).model.n_group == 2
    with pytest.raises(ValueError) as e:
        load_job_config("tiny", str(path), ["model.n_group=2", "model.qk_rope_head_dim=15"])
    assert str(e.value).startswith("override model.qk_rope_head_dim=15: JobConfig.model: qk_rope_head_dim=15")
    # The whole job's own checks (across sections) are named too.
    with pytest.raises(ValueError, match=r"^override train\.recompute_granularity=full: JobConfig: recompute"):
        load_job_config("tiny", None, ["parallel.pipeline_model_parallel_size=2",
                                       "parallel.pipeline_schedule=zero-bubble", "train.recompute_granularity=full"])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_job_config("tiny", str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        load_job_config("tiny", str(bad))


def test_job_config_round_trips_through_dict():
    job = load_job_config("joyai-flash")
    assert JobConfig.from_dict(job.to_dict()) == job
    assert isinstance(job.model, ModelConfig)


def test_a_ramp_starting_above_the_global_batch_is_refused():
    """As megatron-core's ramp-up calculator: accepted exactly where it accepts START INCREMENT SAMPLES. Before, a
    start above global_batch_size passed (its difference divides the increment in Python) and ran no ramp at all."""
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    from megajoy.config import TrainConfig

    for start, increment, gbs in [(16, 8, 8), (24, 8, 8), (4, 4, 8), (8, 4, 16), (3, 2, 8), (12, 4, 8)]:
        try:
            RampupBatchsizeNumMicroBatchesCalculator(gbs, 1, 1, False, 0, start, increment, 100)
            megatron_accepts = True
        except AssertionError:
            megatron_accepts = False
        try:
            TrainConfig(global_batch_size=gbs, micro_batch_size=1, rampup_batch_size=[start, increment, 100])
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == megatron_accepts, (start, increment, gbs)
