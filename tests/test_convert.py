"""tools/convert_ckpt.py against references megajoy did not write: the safetensors library and
transformers for Hugging Face directories, gguf's reader and quantisers for GGUF files, llama.cpp (through
llama-cpp-python) running the GGUF, and llama.cpp's own convert_hf_to_gguf.py on the same checkpoint."""

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import TEST_VOCAB, TINY_MODEL_OVERRIDES, load_tool, random_model, rel_err, small_config
from megajoy.ckpt.native import load_model_dir, model_state
from megajoy.ckpt.view import state_view
from megajoy.cli import main
from megajoy.model import create_model
from megajoy.quant.formats import WeightFormat
from megajoy.train.checkpoint import latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.convert import SIZES, TOOL, SyntheticStore, run_measured, write_synthetic  # noqa: E402

# Every dimension a multiple of 32, so Q8_0 / Q4_0 blocks tile every weight (attn_k_b's rows are nope wide).
GGUF_MODEL_OVERRIDES = [
    "model.vocab_size=320", "model.hidden_size=64", "model.intermediate_size=64", "model.moe_intermediate_size=32",
    "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.q_lora_rank=32", "model.kv_lora_rank=32",
    "model.qk_nope_head_dim=32", "model.qk_rope_head_dim=16", "model.v_head_dim=32", "model.n_routed_experts=4",
    "model.num_experts_per_tok=2",
]


def convert(*argv) -> int:
    return load_tool("convert_ckpt").main([str(a) for a in argv])


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def llama_cpp():
    """llama-cpp-python is part of CI's install (.ci/run); elsewhere the llama.cpp tests skip without it."""
    if os.environ.get("CI"):
        import llama_cpp as module
        return module
    return pytest.importorskip("llama_cpp")


def load_llama(path):
    # f32 KV cache: llama.cpp's default f16 cache alone costs ~1e-4 relative error
    return llama_cpp().Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)


def llama_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)]))


def gguf_config(**kw):
    return small_config(vocab_size=TEST_VOCAB, qk_nope_head_dim=32, **kw)


# ------------------------------------------------------------------------------------------ Hugging Face

def test_hf_import_then_export_reproduces_the_files(tmp_path, tokenizer_file):
    """megajoy -> HF -> megajoy -> HF: the two HF directories are identical file for file, sharded with an
    index, and the safetensors library reads every tensor the index lists from the shard it names."""
    from safetensors import safe_open

    ckpt = tmp_path / "ckpt"
    assert main(["init", "--out", str(ckpt), "--tokenizer", tokenizer_file, "--seed", "5"]
                + sets(TINY_MODEL_OVERRIDES)) == 0
    _, original, _ = load_model_dir(str(ckpt))
    for dtype in ("bf16", "fp32"):
        first, imported, second = (tmp_path / f"{stem}_{dtype}" for stem in ("hf1", "mj", "hf2"))
        assert convert("--input", ckpt, "--output", first, "--to", "hf", "--dtype", dtype, "--max-shard-size", "40KB") == 0
        assert convert("--input", first, "--output", imported, "--to", "megajoy", "--dtype", dtype) == 0
        assert convert("--input", imported, "--output", second, "--to", "hf", "--dtype", dtype,
                       "--max-shard-size", "40KB") == 0
        files = sorted(os.listdir(first))
        assert files == sorted(os.listdir(second))
        shards = [f for f in files if f.endswith(".safetensors")]
        assert len(shards) >= 3 and {"model.safetensors.index.json", "config.json", "generation_config.json",
                                     "tokenizer.json", "tokenizer_config.json"} <= set(files)
        for f in files:
            assert filecmp.cmp(first / f, second / f, shallow=False), f
        index = json.loads((first / "model.safetensors.index.json").read_text())
        total, torch_dtype = 0, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        for shard in shards:
            with safe_open(str(first / shard), "pt") as f:
                shard_bytes = 0
                for key in f.keys():
                    assert index["weight_map"][key] == shard
                    tensor = f.get_tensor(key)
                    shard_bytes += tensor.numel() * tensor.element_size()
                    bias = key.endswith("e_score_correction_bias")
                    assert tensor.dtype == (torch.float32 if bias else torch_dtype), key
                assert shard_bytes <= 40_000 or len(f.keys()) == 1  # a tensor larger than a shard stands alone
                total += shard_bytes
        assert index["metadata"]["total_size"] == total
        assert len(index["weight_map"]) == sum(len(safe_open(str(first / s), "pt").keys()) for s in shards)
        # the safetensors library's view of one expert and of the attention against the source checkpoint
        shard = index["weight_map"]["model.layers.1.mlp.experts.2.up_proj.weight"]
        with safe_open(str(first / shard), "pt") as f:
            up = f.get_tensor("model.layers.1.mlp.experts.2.up_proj.weight")
        inter = original["layers.1.mlp.experts.down_proj"].shape[-1]
        assert torch.equal(up, original["layers.1.mlp.experts.gate_up_proj"][2, inter:].to(torch_dtype))
        _, back, _ = load_model_dir(str(imported))
        for name, tensor in original.items():
            assert torch.equal(back[name], tensor.to(torch_dtype).float()), name
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def hf_model(num_nextn_predict_layers=0, seed=0):
    """transformers' own DeepseekV3ForCausalLM (random weights and router bias), with its config."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, max_position_embeddings=256, rope_theta=1e4,
        num_nextn_predict_layers=num_nextn_predict_layers)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * 0.05)
    return model


def test_import_of_a_transformers_checkpoint(tmp_path, capsys):
    """A directory written by transformers' save_pretrained (sharded) imports; megajoy's logits equal
    transformers', and exporting the import gives transformers back every tensor it saved. With
    transformers' default num_nextn_predict_layers=1 it saves no MTP layer: the import has none, and says
    so (before: "16 tensor(s) missing", though transformers loads its own directory)."""
    from transformers import AutoModelForCausalLM

    reference = hf_model(num_nextn_predict_layers=1)
    reference.save_pretrained(tmp_path / "tf", max_shard_size="200KB")
    assert os.path.exists(tmp_path / "tf" / "model.safetensors.index.json")
    assert json.loads((tmp_path / "tf" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert convert("--input", tmp_path / "tf", "--output", tmp_path / "mj", "--to", "megajoy") == 0
    assert "num_nextn_predict_layers=1 but the weights hold no MTP layer" in capsys.readouterr().err
    job, state, _ = load_model_dir(str(tmp_path / "mj"))
    assert job.model.n_group == 2 and job.model.num_nextn_predict_layers == 0
    model = create_model(job.model, seed=None)
    model.load_state_dict(state)
    ids = torch.randint(0, 256, (2, 33))
    with torch.no_grad():
        assert rel_err(model.eval()(ids).logits, reference(ids).logits) <= 1e-5
    assert convert("--input", tmp_path / "mj", "--output", tmp_path / "hf", "--to", "hf", "--dtype", "fp32") == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    expected = reference.state_dict()
    got = again.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_fp8_block_quantised_import(tmp_path):
    """DeepSeek-V3's released layout: fp8 e4m3 weights with one fp32 `weight_scale_inv` per block."""
    from safetensors.torch import load_file, save_file

    model = random_model(small_config(), seed=4)
    export_hf(model, tmp_path / "bf")
    weights = load_file(str(tmp_path / "bf" / "model.safetensors"))
    block = (16, 32)
    expected, fp8 = {}, {}
    for name, w in weights.items():
        if w.ndim == 2 and ("self_attn" in name or "mlp" in name) and "layernorm" not in name \
                and not name.endswith("mlp.gate.weight"):
            grid = (-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1]))
            scale_inv = torch.empty(grid)
            q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
            dequant = torch.empty_like(w)
            for i in range(scale_inv.shape[0]):  # block by block, as the format is defined
                for j in range(scale_inv.shape[1]):
                    rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
                    scale_inv[i, j] = w[rows, cols].abs().max() / 448  # e4m3's largest value
                    q[rows, cols] = (w[rows, cols] / scale_inv[i, j]).to(torch.float8_e4m3fn)
                    dequant[rows, cols] = q[rows, cols].float() * scale_inv[i, j]
            fp8[name], fp8[name + "_scale_inv"] = q, scale_inv
            expected[name] = dequant
        else:
            fp8[name] = w
    save_file(fp8, str(tmp_path / "bf" / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "bf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (tmp_path / "bf" / "config.json").write_text(json.dumps(config))
    assert convert("--input", tmp_path / "bf", "--output", tmp_path / "hf32", "--to", "hf", "--dtype", "fp32") == 0
    out = load_file(str(tmp_path / "hf32" / "model.safetensors"))
    assert len(expected) > 20
    for name, w in expected.items():
        assert out[name].dtype == torch.float32 and torch.equal(out[name], w), name
    assert not [k for k in out if k.endswith("_scale_inv")]


def export_hf(model, directory, dtype=torch.float32, tokenizer=None):
    from megajoy.ckpt.hf import save_hf_dir

    save_hf_dir(str(directory), state_view(model.cfg, model_state(model), tokenizer), dtype=dtype)


def test_int4_export_imports_back_to_the_qat_weights(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert main(["init", "--out", str(ckpt), "--seed", "2"] + sets(GGUF_MODEL_OVERRIDES)) == 0
    assert convert("--input", ckpt, "--output", tmp_path / "int4", "--to", "hf", "--int4", "--int4-group", "32",
                   "--dtype", "fp32") == 0
    assert convert("--input", tmp_path / "int4", "--output", tmp_path / "back", "--to", "megajoy") == 0
    _, original, _ = load_model_dir(str(ckpt))
    _, back, _ = load_model_dir(str(tmp_path / "back"))
    fmt = WeightFormat.of("int4", 32)
    for name, tensor in original.items():
        want = fmt.fake_quant(tensor) if ".mlp.experts." in name else tensor
        assert torch.equal(back[name], want), name
    assert not torch.equal(back["layers.1.mlp.experts.down_proj"], original["layers.1.mlp.experts.down_proj"])


# ------------------------------------------------------------------------------------------ streaming

def kill_when_started(argv, tmp_prefix) -> None:
    """Start a conversion and kill -9 it once its temporary output holds 100 MB."""
    process = subprocess.Popen(TOOL + [str(a) for a in argv])
    parent, stem = os.path.split(tmp_prefix)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        partial = [os.path.join(parent, p) for p in os.listdir(parent) if p.startswith(stem + ".tmp-")]
        if partial and _size(partial[0]) > 100e6:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the conversion finished before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()


def _size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def test_streaming_conversion_of_a_1b_checkpoint(tmp_path, tokenizer_file):
    """Converting a 1.0B-parameter checkpoint (2.1 GB in bf16; the benchmark's 2.3B model with half its
    layers, the same tensor sizes) either way peaks below 1 GB RSS; kill -9 in the middle of a conversion
    (directory or GGUF file) leaves the previous output as it was and nothing complete-looking."""
    from megajoy.ckpt.safetensors_io import SafetensorsDir
    from megajoy.config import ModelConfig

    cfg = ModelConfig(**dict(SIZES["2b"], num_hidden_layers=3))
    src, hf, back = tmp_path / "src", tmp_path / "hf", tmp_path / "back"
    try:
        assert write_synthetic(str(src), cfg, tokenizer_file) > 1.0e9
        hf.mkdir()
        (hf / "config.json").write_text('{"previous": true}')
        kill_when_started(["--input", src, "--output", hf, "--to", "hf"], str(hf))
        assert os.listdir(hf) == ["config.json"] and json.loads((hf / "config.json").read_text()) == {"previous": True}
        gguf_path = tmp_path / "model.gguf"
        kill_when_started(["--input", src, "--output", gguf_path, "--to", "gguf", "--gguf-type", "q8_0"], str(gguf_path))
        assert not gguf_path.exists()
        for partial in [p for p in os.listdir(tmp_path) if ".tmp-" in p]:
            shutil.rmtree(tmp_path / partial) if os.path.isdir(tmp_path / partial) else os.remove(tmp_path / partial)

        status, _, export_mb = run_measured(TOOL + ["--input", str(src), "--output", str(hf), "--to", "hf",
                                                    "--max-shard-size", "1GB"])
        assert status == 0 and export_mb < 1000, export_mb
        status, _, import_mb = run_measured(TOOL + ["--input", str(hf), "--output", str(back), "--to", "megajoy",
                                                    "--dtype", "bf16"])
        assert status == 0 and import_mb < 1000, import_mb
        store = SyntheticStore(cfg)
        exported, imported = SafetensorsDir(str(hf)), SafetensorsDir(str(back))
        assert len({f for f in exported.weight_map.values()}) >= 3
        name = "model.layers.1.mlp.experts.17.down_proj.weight"
        assert torch.equal(exported.load(name), store.load_rows("layers.1.mlp.experts.down_proj", 17, 18)[0])
        for name in ("layers.2.mlp.experts.gate_up_proj", "layers.0.self_attn.kv_b_proj.weight", "lm_head.weight"):
            assert torch.equal(imported.load_rows(name, 10, 12), store.load_rows(name, 10, 12)), name
    finally:
        for path in (src, hf, back):
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------ GGUF

def expected_gguf_tensors(cfg, state) -> dict[str, torch.Tensor]:
    """llama.cpp's deepseek2 tensor names (llama-arch.cpp), each with the megajoy weight it holds."""
    heads, nope, inter = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.moe_intermediate_size
    out = {"token_embd.weight": state["embed_tokens.weight"], "output_norm.weight": state["norm.weight"],
           "output.weight": state["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        attn = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
                "attn_output": "self_attn.o_proj"}
        if cfg.q_lora_rank:
            attn.update(attn_q_a="self_attn.q_a_proj", attn_q_a_norm="self_attn.q_a_layernorm",
                        attn_q_b="self_attn.q_b_proj")
        else:
            attn.update(attn_q="self_attn.q_proj")
        if i < cfg.first_k_dense_replace:
            attn.update(ffn_gate="mlp.gate_proj", ffn_up="mlp.up_proj", ffn_down="mlp.down_proj")
        else:
            attn.update(ffn_gate_inp="mlp.gate", ffn_gate_shexp="mlp.shared_experts.gate_proj",
                        ffn_up_shexp="mlp.shared_experts.up_proj", ffn_down_shexp="mlp.shared_experts.down_proj")
            gate_up = state[p + "mlp.experts.gate_up_proj"]
            out[b + "ffn_gate_exps.weight"] = gate_up[:, :inter]
            out[b + "ffn_up_exps.weight"] = gate_up[:, inter:]
            out[b + "ffn_down_exps.weight"] = state[p + "mlp.experts.down_proj"]
            out[b + "exp_probs_b.bias"] = state[p + "mlp.gate.e_score_correction_bias"]
        for g, m in attn.items():
            out[b + g + ".weight"] = state[p + m + ".weight"]
        kv_b = state[p + "self_attn.kv_b_proj.weight"].view(heads, -1, cfg.kv_lora_rank)
        out[b + "attn_k_b.weight"] = kv_b[:, :nope].transpose(1, 2)
        out[b + "attn_v_b.weight"] = kv_b[:, nope:]
    return out


def read_gguf(path):
    """{name: (type name, dequantised float tensor in torch order, raw bytes)} and the metadata."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        values = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type))).float().reshape(shape)
        tensors[t.name] = (t.tensor_type.name, values, np.asarray(t.data))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return tensors, fields


def block_error_bound(src: torch.Tensor, gguf_type: str) -> torch.Tensor:
    """Per element, ggml's worst case for its 32-block: Q8_0 rounds to steps of amax/127 (half a step,
    plus the fp16 rounding of the scale); Q4_0 steps by amax/8 and clamps the far side's top step."""
    amax = src.reshape(-1, 32).abs().amax(-1, keepdim=True)
    bound = amax / 127 * 0.6 if gguf_type == "Q8_0" else amax / 8 * 1.1
    return bound.expand(-1, 32).reshape(src.shape)


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_gguf_reads_back_with_gguf(gguf_type, tmp_path, tokenizer_file):
    import gguf

    cfg = small_config(vocab_size=TEST_VOCAB)  # qk_nope_head_dim=16: attn_k_b rows are not 32-wide blocks
    model = random_model(cfg, seed=6)
    state = model_state(model)
    ckpt = tmp_path / "ckpt"
    from megajoy.ckpt.native import save_model_dir

    save_model_dir(str(ckpt), state_view(cfg, state, tokenizer_file))
    path = tmp_path / "m.gguf"
    assert convert("--input", ckpt, "--output", path, "--to", "gguf", "--gguf-type", gguf_type) == 0
    tensors, fields = read_gguf(path)
    expected = expected_gguf_tensors(cfg, state)
    assert sorted(tensors) == sorted(expected)
    quantized = gguf_type in ("q8_0", "q4_0")
    for name, src in expected.items():
        kind, values, raw = tensors[name]
        stays_f32 = src.ndim == 1 or name.endswith("ffn_gate_inp.weight")
        fallback = quantized and name.endswith("attn_k_b.weight")
        want = "F32" if stays_f32 else "F16" if fallback else gguf_type.upper()
        assert kind == want, name
        src = src.contiguous()
        if want == "F32":
            assert torch.equal(values, src), name
        elif want in ("F16", "BF16"):
            assert torch.equal(values, src.to(getattr(torch, {"F16": "float16", "BF16": "bfloat16"}[want])).float()), name
        else:  # bytes as gguf's own quantiser makes them, within half a step of the source
            qtype = gguf.GGMLQuantizationType[want]
            assert np.array_equal(raw.reshape(-1), gguf.quants.quantize(src.numpy(), qtype).reshape(-1)), name
            assert ((values - src).abs() <= block_error_bound(src, want)).all(), name
    assert fields["general.architecture"] == "deepseek2"
    meta = {k.removeprefix("deepseek2."): v for k, v in fields.items() if k.startswith("deepseek2.")}
    assert meta["block_count"] == cfg.num_hidden_layers  # the MTP layer is not exported
    assert meta["attention.kv_lora_rank"] == cfg.kv_lora_rank and meta["attention.q_lora_rank"] == cfg.q_lora_rank
    assert meta["attention.key_length_mla"] == cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    assert meta["attention.value_length_mla"] == cfg.v_head_dim
    assert meta["attention.key_length"] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert meta["attention.value_length"] == cfg.kv_lora_rank and meta["attention.head_count_kv"] == 1
    assert meta["rope.dimension_count"] == cfg.qk_rope_head_dim and meta["rope.freq_base"] == cfg.rope_theta
    assert meta["leading_dense_block_count"] == cfg.first_k_dense_replace
    assert (meta["expert_count"], meta["expert_used_count"], meta["expert_shared_count"]) == (8, 2, 1)
    assert meta["expert_feed_forward_length"] == cfg.moe_intermediate_size
    assert meta["expert_weights_scale"] == pytest.approx(cfg.routed_scaling_factor)
    assert meta["expert_weights_norm"] is True
    assert meta["expert_gating_func"] == int(gguf.ExpertGatingFuncType.SIGMOID)
    spec = json.load(open(tokenizer_file))
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert len(fields["tokenizer.ggml.merges"]) == len(spec["model"]["merges"])
    assert fields["tokenizer.ggml.tokens"][:3] == ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (0, 1)


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
LLAMA_CONFIGS = {
    "base": dict(),
    "yarn": dict(rope_scaling=YARN),
    "yarn_mscale_0.707": dict(rope_scaling=dict(YARN, factor=8.0, original_max_position_embeddings=8, mscale=0.707,
                                                mscale_all_dim=0.707), routed_scaling_factor=1.0),
    "group_limited": dict(n_group=4, topk_group=2, num_experts_per_tok=3),
    "greedy_group_limited": dict(topk_method="greedy", n_group=4, topk_group=2, num_experts_per_tok=3),
    "no_q_lora_two_dense_two_shared": dict(q_lora_rank=None, first_k_dense_replace=2, num_hidden_layers=4,
                                           n_shared_experts=2),
    "no_norm_scale_1.7": dict(norm_topk_prob=False, routed_scaling_factor=1.7),
}


@pytest.mark.parametrize("name", sorted(LLAMA_CONFIGS))
def test_llama_cpp_logits_equal_megajoy(name, tmp_path, tokenizer_file):
    cfg = gguf_config(**LLAMA_CONFIGS[name])
    model = random_model(cfg, seed=len(name))
    from megajoy.ckpt.gguf_export import save_gguf

    save_gguf(str(tmp_path / "m.gguf"), state_view(cfg, model_state(model), tokenizer_file), "f32")
    ids = torch.randint(3, cfg.vocab_size, (48,)).tolist()  # 48 > YaRN's original 16 / 8 positions
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    assert rel_err(llama_logits(load_llama(tmp_path / "m.gguf"), ids), ours) <= 1e-5


def pretrain(out, data_prefix, tokenizer_file, iters, *extra):
    argv = ["pretrain", "--data-path", data_prefix, "--tokenizer", tokenizer_file, "--seq-length", "64",
            "--global-batch-size", "8", "--micro-batch-size", "4", "--train-iters", str(iters), "--log-interval",
            "10", "--eval-interval", "1000", "--lr-warmup-iters", "2", "--lr", "3e-3", "--out", str(out)]
    assert main(argv + sets(GGUF_MODEL_OVERRIDES) + list(extra)) == 0
    job, state, tokenizer = load_model_dir(latest_checkpoint(str(out)))
    model = create_model(job.model, seed=None)
    model.load_state_dict(state)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_prefix, tokenizer_file):
    out = tmp_path_factory.mktemp("trained") / "out"
    model, tokenizer = pretrain(out, data_prefix, tokenizer_file, 60)
    return out, model, tokenizer


def test_llama_cpp_continues_a_trained_model_as_megajoy_does(trained, tmp_path):
    """A model trained by `megajoy pretrain`, exported straight from its output directory: llama.cpp
    tokenizes prompts as megajoy's tokenizer does and its greedy continuation is megajoy's."""
    from tokenizers import Tokenizer

    from megajoy.model.generate import greedy

    out, model, tokenizer_path = trained
    path = tmp_path / "trained.gguf"
    assert convert("--input", out, "--output", path, "--to", "gguf", "--gguf-type", "f32") == 0
    llm = load_llama(path)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    for text in ("The cat sat on", "Every model routes quickly. A dog", "  naïve café, 3.14\n\tflew"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text).ids
    for prompt in ("The cat sat on", "Some expert"):
        ids = tokenizer.encode(prompt).ids
        ours = greedy(model, ids, 24, eos_token_id=model.cfg.eos_token_id)
        theirs = []
        for token in llm.generate(ids, temp=0.0, reset=True):
            theirs.append(token)
            if token == model.cfg.eos_token_id or len(theirs) == 24:
                break
        assert theirs == ours, (prompt, tokenizer.decode(theirs), tokenizer.decode(ours))
        assert len(set(ours)) > 3  # a real continuation, not one repeated token


def test_quantised_export_before_the_qat_start_says_so(tmp_path, data_prefix, tokenizer_file, capsys):
    """A checkpoint of a --qat run saved before --qat-start-iter was never trained on the grid: its quantised
    exports (GGUF q4_0 / qat, HF --int4) say so; one step after the start, they do not."""
    out = tmp_path / "out"
    pretrain(out, data_prefix, tokenizer_file, 2, "--qat", "q4_0", "--qat-start-iter", "2")
    capsys.readouterr()
    exports = [("gguf", "--gguf-type", "q4_0"), ("gguf", "--gguf-type", "qat"), ("hf", "--int4-group", "32")]
    for target, *flags in exports:
        assert convert("--input", out, "--output", tmp_path / f"early_{flags[-1]}", "--to", target, *flags) == 0
        assert "is step 2, before its QAT (--qat q4_0) starts at --qat-start-iter 2" in capsys.readouterr().err
    pretrain(out, data_prefix, tokenizer_file, 3, "--qat", "q4_0", "--qat-start-iter", "2", "--resume")
    capsys.readouterr()
    for target, *flags in exports:
        assert convert("--input", out, "--output", tmp_path / f"late_{flags[-1]}", "--to", target, *flags) == 0
        assert "before its QAT" not in capsys.readouterr().err


def test_gguf_type_qat_is_the_training_grid(tmp_path, data_prefix, tokenizer_file, capsys):
    """A model trained with --qat q4_0: `--gguf-type qat` stores the experts as Q4_0 blocks that dequantise
    to exactly the weights the training forward used, the rest in --dtype; llama.cpp's logits equal the
    QAT forward's."""
    from megajoy.quant.qat import set_qat

    out = tmp_path / "out"
    model, _ = pretrain(out, data_prefix, tokenizer_file, 4, "--qat", "q4_0")
    path = tmp_path / "qat.gguf"
    assert convert("--input", out, "--output", path, "--to", "gguf", "--gguf-type", "qat", "--dtype", "fp32") == 0
    tensors, fields = read_gguf(path)
    fmt = WeightFormat.of("q4_0")
    expected = expected_gguf_tensors(model.cfg, model_state(model))
    for name, src in expected.items():
        kind, values, _ = tensors[name]
        if "_exps." in name:
            assert kind == "Q4_0" and torch.equal(values, fmt.fake_quant(src)), name
        else:
            assert kind == "F32" and torch.equal(values, src), name
    assert fields["general.file_type"] == 2  # MOSTLY_Q4_0
    ids = torch.randint(3, TEST_VOCAB, (40,)).tolist()
    with torch.no_grad():
        master = model(torch.tensor([ids])).logits[0]
        set_qat(model, fmt)
        qat = model(torch.tensor([ids])).logits[0]
    theirs = llama_logits(load_llama(path), ids)
    # ggml multiplies a Q4_0 weight by activations it rounds to Q8_0 blocks, hence no 1e-5 here
    assert rel_err(theirs, qat) <= 5e-3
    assert rel_err(theirs, qat) < rel_err(theirs, master) / 5  # it runs the trained grid, not the master weights
    capsys.readouterr()
    assert convert("--input", out, "--output", tmp_path / "q8.gguf", "--to", "gguf", "--gguf-type", "q8_0") == 0
    assert "was trained with --qat q4_0: its q8_0 weights are not the ones its forward used" in capsys.readouterr().err


def test_gguf_matches_llama_cpp_own_converter(tmp_path, tokenizer_file):
    """llama.cpp's convert_hf_to_gguf.py on the same Hugging Face directory writes the same tensors, byte
    for byte, and the same metadata (general.* aside)."""
    from benchmarks.llama_cpp_reference import converter_command

    llama_cpp()  # the reference converter belongs with the llama.cpp tests
    cfg = gguf_config()
    model = random_model(cfg, seed=8)
    export_hf(model, tmp_path / "hf", tokenizer=tokenizer_file)
    for gguf_type in ("q8_0", "bf16"):
        ours, theirs = tmp_path / f"ours_{gguf_type}.gguf", tmp_path / f"theirs_{gguf_type}.gguf"
        assert convert("--input", tmp_path / "hf", "--output", ours, "--to", "gguf", "--gguf-type", gguf_type) == 0
        subprocess.run(converter_command(str(tmp_path / "hf"), str(theirs), gguf_type), check=True,
                       capture_output=True)
        a, meta_a = read_gguf(ours)
        b, meta_b = read_gguf(theirs)
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name][0] == b[name][0] and np.array_equal(a[name][2], b[name][2]), name
        strip = lambda m: {k: v for k, v in m.items() if not k.startswith(("general.", "GGUF."))}  # noqa: E731
        assert strip(meta_a) == strip(meta_b)


# ------------------------------------------------------------------------------------------ bad input

@pytest.fixture
def hf_dir(tmp_path, tokenizer_file):
    model = random_model(gguf_config(), seed=9)
    export_hf(model, tmp_path / "hf", tokenizer=tokenizer_file)
    return tmp_path / "hf"


def rewrite(directory, edit):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(directory / "model.safetensors"))
    edit(weights)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("case", ["unknown", "misshaped_expert", "misshaped_dense", "missing"])
def test_bad_hf_tensors_are_named(case, hf_dir, tmp_path, capsys):
    name = {"unknown": "model.layers.0.self_attn.extra_proj.weight",
            "misshaped_expert": "model.layers.1.mlp.experts.3.up_proj.weight",
            "misshaped_dense": "model.layers.1.self_attn.o_proj.weight",
            "missing": "model.layers.1.mlp.experts.7.down_proj.weight"}[case]

    def edit(weights):
        if case == "missing":
            del weights[name]
        else:
            weights[name] = torch.zeros(3, 5)

    rewrite(hf_dir, edit)
    for target in ("megajoy", "gguf"):
        output = tmp_path / f"out_{target}"
        assert convert("--input", hf_dir, "--output", output, "--to", target) == 2
        err = capsys.readouterr().err
        assert f"'{name}'" in err and {"unknown": "unknown tensor", "missing": "missing"}.get(case, "has shape (3, 5)") in err
        assert not output.exists()


def test_missing_or_truncated_shards_are_named(tmp_path, tokenizer_file, capsys):
    model = random_model(gguf_config(), seed=10)
    from megajoy.ckpt.hf import save_hf_dir

    save_hf_dir(str(tmp_path / "hf"), state_view(model.cfg, model_state(model), tokenizer_file),
                dtype=torch.float32, max_shard_bytes=100_000)
    shards = sorted(p for p in os.listdir(tmp_path / "hf") if p.endswith(".safetensors"))
    os.truncate(tmp_path / "hf" / shards[1], os.path.getsize(tmp_path / "hf" / shards[1]) - 100)
    assert convert("--input", tmp_path / "hf", "--output", tmp_path / "o", "--to", "megajoy") == 2
    err = capsys.readouterr().err
    assert shards[1] in err and "truncated safetensors file: tensor" in err
    os.remove(tmp_path / "hf" / shards[1])
    assert convert("--input", tmp_path / "hf", "--output", tmp_path / "o", "--to", "megajoy") == 2
    err = capsys.readouterr().err
    assert f"shard {tmp_path / 'hf' / shards[1]} is missing" in err
    assert not (tmp_path / "o").exists()


def test_gguf_export_refusals(hf_dir, tmp_path, capsys):
    assert convert("--input", hf_dir, "--output", tmp_path / "m.gguf", "--to", "gguf", "--gguf-type", "qat") == 2
    assert "--gguf-type qat needs a checkpoint trained with fake-quant" in capsys.readouterr().err
    os.remove(hf_dir / "tokenizer.json")
    assert convert("--input", hf_dir, "--output", tmp_path / "m.gguf", "--to", "gguf") == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_gguf_dtype_is_refused_unless_gguf_type_qat(hf_dir, tmp_path, capsys):
    """--dtype fp32 with --to gguf (and the default --gguf-type f16) wrote f16 weights without a word; it is
    refused, pointing at --gguf-type, which writes f32 weights equal to the input's."""
    from safetensors.torch import load_file

    assert convert("--input", hf_dir, "--output", tmp_path / "m.gguf", "--to", "gguf", "--dtype", "fp32") == 2
    assert "--dtype applies to --to gguf only with --gguf-type qat" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()
    assert convert("--input", hf_dir, "--output", tmp_path / "m.gguf", "--to", "gguf", "--gguf-type", "f32") == 0
    tensors, _ = read_gguf(tmp_path / "m.gguf")
    kind, values, _ = tensors["blk.1.attn_output.weight"]
    assert kind == "F32"
    assert torch.equal(values, load_file(str(hf_dir / "model.safetensors"))["model.layers.1.self_attn.o_proj.weight"])


def test_outputs_that_are_not_models_are_not_replaced(hf_dir, tmp_path, capsys):
    """An output whose replacement would delete what is not a model is refused, before anything is written:
    a training run converted onto itself (its checkpoints and logs would go), a directory of other files, a
    file where a directory goes and the reverse. A model directory, the input's own included, is replaced."""
    run = tmp_path / "run"
    assert convert("--input", hf_dir, "--output", run / "checkpoints" / "iter_0000001", "--to", "megajoy") == 0
    (run / "checkpoints" / "latest").write_text("iter_0000001")
    (run / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me")
    refused = {(run, "megajoy"): "contains the input", (tmp_path / "notes", "hf"): "holds no model",
               (tmp_path / "file", "hf"): "is not a directory", (tmp_path / "notes", "gguf"): "is a directory"}
    for (output, to), message in refused.items():
        assert convert("--input", run, "--output", output, "--to", to) == 2
        assert message in capsys.readouterr().err
    assert sorted(os.listdir(run)) == ["checkpoints", "metrics.jsonl"]
    assert (tmp_path / "notes" / "todo.txt").read_text() == (tmp_path / "file").read_text() == "keep me"
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]
    assert convert("--input", hf_dir, "--output", hf_dir, "--to", "hf", "--dtype", "fp32") == 0
    assert convert("--input", hf_dir, "--output", tmp_path / "back", "--to", "megajoy") == 0


def test_outputs_that_are_the_inputs_files_links_or_unwritable(hf_dir, tmp_path, capsys):
    """A GGUF written over one of the input's own files is refused (before, the weights file became the
    GGUF and the input was lost); a .gguf beside them is fine. An output that is a symbolic link to a model
    directory is replaced by the new model, the link's target left as it was (before: an OSError from
    rmtree on the moved-aside link, after the model had been written). A path the file system refuses is
    one error line, not a traceback."""
    kept = {name: (hf_dir / name).read_bytes() for name in ("model.safetensors", "config.json")}
    for name in kept:
        assert convert("--input", hf_dir, "--output", hf_dir / name, "--to", "gguf") == 2
        assert "is a file of the input" in capsys.readouterr().err
    assert {name: (hf_dir / name).read_bytes() for name in kept} == kept
    assert convert("--input", hf_dir, "--output", hf_dir / "model.gguf", "--to", "gguf") == 0
    assert convert("--input", hf_dir, "--output", tmp_path / "v1", "--to", "hf") == 0
    v1 = {p.name: p.read_bytes() for p in (tmp_path / "v1").iterdir()}
    (tmp_path / "current").symlink_to(tmp_path / "v1")
    assert convert("--input", hf_dir, "--output", tmp_path / "current", "--to", "hf", "--dtype", "fp32") == 0
    assert not (tmp_path / "current").is_symlink() and (tmp_path / "current" / "config.json").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "v1").iterdir()} == v1
    assert (tmp_path / "current" / "model.safetensors").read_bytes() != v1["model.safetensors"]  # fp32, not bf16
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]
    (tmp_path / "file").write_text("keep me")
    for to, output in (("hf", tmp_path / "file" / "out"), ("gguf", tmp_path / "file" / "m.gguf")):
        assert convert("--input", hf_dir, "--output", output, "--to", to) == 2
        err = capsys.readouterr().err
        assert err.startswith("convert_ckpt: error: ") and "Traceback" not in err and str(tmp_path / "file") in err


def test_the_tokenizer_config_travels_with_the_tokenizer(hf_dir, tmp_path, data_prefix):
    """A Hugging Face model's tokenizer_config.json (its chat template) goes wherever its tokenizer goes:
    into megajoy's model directory and pretraining's checkpoints, back out to Hugging Face as it was, and into
    the GGUF as tokenizer.chat_template, as llama.cpp's own converter writes it. Before, the export wrote a
    new one without the template (apply_chat_template: "tokenizer.chat_template is not set")."""
    from transformers import AutoTokenizer

    from megajoy.ckpt.native import read_job_config
    from megajoy.config import model_overrides

    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    assert convert("--input", hf_dir, "--output", tmp_path / "mj", "--to", "megajoy") == 0
    same_model = sets(model_overrides(read_job_config(str(tmp_path / "mj")).model))
    assert main(["pretrain", "--init", str(tmp_path / "mj"), "--data-path", data_prefix, "--tokenizer",
                 str(tmp_path / "mj" / "tokenizer.json"), "--train-iters", "1", "--eval-interval", "100",
                 "--seq-length", "32", "--global-batch-size", "2", "--micro-batch-size", "2",
                 "--out", str(tmp_path / "run")] + same_model) == 0
    trained = latest_checkpoint(str(tmp_path / "run"))
    assert json.loads(open(os.path.join(trained, "tokenizer_config.json")).read()) == config
    assert convert("--input", tmp_path / "run", "--output", tmp_path / "back", "--to", "hf") == 0
    assert json.loads((tmp_path / "back" / "tokenizer_config.json").read_text()) == config
    chat = [{"role": "user", "content": "2+2?"}]
    rendered = AutoTokenizer.from_pretrained(tmp_path / "back").apply_chat_template(chat, tokenize=False)
    assert rendered == "<|user|>2+2?<|assistant|>"
    assert convert("--input", tmp_path / "back", "--output", tmp_path / "m.gguf", "--to", "gguf") == 0
    assert read_gguf(tmp_path / "m.gguf")[1]["tokenizer.chat_template"] == config["chat_template"]


CHAT_CASES = {"hand-made": {
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                 {"role": "assistant", "content": "a", "reasoning_content": "r1"},
                 {"role": "user", "content": "more ü"},
                 {"role": "assistant", "content": "b", "reasoning_content": "r2",
                  "tool_calls": [{"name": "f", "arguments": {"x": 1, "y": "s", "z": [1, "é"]}}]},
                 {"role": "tool", "content": "out"}, {"role": "assistant", "content": "done"}],
    "tools": [{"name": "f", "description": "é", "parameters": {"b": 1, "a": 2}}]}}


def chat_conversations():
    from megajoy.data.demo import sft_conversations

    return sft_conversations(60, seed=0) + list(CHAT_CASES.values())


def chat_template_cases():
    """(conversation, thinking mode, generation prompt) for the demo SFT conversations (thinking, tools, tool
    results, system prompts) and the hand-made one, with and without the generation prompt (the last turn
    left for the model), thinking on, off and automatic; 6 x 61 in all."""
    for conversation in chat_conversations():
        for mode in ("auto", "on", "off"):
            for prompt in (False, True):
                messages = conversation["messages"][:-1] if prompt else conversation["messages"]
                yield dict(conversation, messages=messages), mode, prompt


def trained_text(conversation, mode, prompt) -> str:
    from megajoy.data.chat import render

    return "".join(p.text for p in render(conversation, mode, generation_prompt=prompt))


def thinking_kwargs(mode) -> dict:
    return {"on": {"thinking": True}, "off": {"thinking": False}}.get(mode, {})


@pytest.fixture
def chat_tokenizer(tmp_path, tokenizer_file):
    """The tokenizer SFT trains and saves beside its checkpoints (template tokens added), and its config."""
    import dataclasses

    from megajoy.config import tiny
    from megajoy.data.chat import TEMPLATE_TOKENS
    from megajoy.data.sft import ChatTokenizer

    cfg = dataclasses.replace(tiny(), vocab_size=TEST_VOCAB + len(TEMPLATE_TOKENS))
    chat = ChatTokenizer(tokenizer_file, cfg.vocab_size)
    (tmp_path / "run").mkdir()
    chat.save(str(tmp_path / "run" / "tokenizer.json"))
    return chat, str(tmp_path / "run" / "tokenizer.json"), cfg


def test_exported_chat_template_renders_as_megajoy_trains(tmp_path, chat_tokenizer):
    """A chat model's Hugging Face export carries megajoy's template as Jinja: transformers'
    apply_chat_template gives the tokens megajoy trains on (render + ChatTokenizer) in every case of
    chat_template_cases. Before, the export had no chat template."""
    from transformers import AutoTokenizer

    from megajoy.data.chat import render
    from megajoy.data.tokenizer import write_hf_tokenizer_files

    chat, tokenizer_json, cfg = chat_tokenizer
    (tmp_path / "hf").mkdir()
    write_hf_tokenizer_files(tokenizer_json, str(tmp_path / "hf"), cfg)
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    checked = 0
    for conversation, mode, prompt in chat_template_cases():
        text = hf.apply_chat_template(conversation["messages"], tools=conversation.get("tools"),
                                      add_generation_prompt=prompt, tokenize=False, **thinking_kwargs(mode))
        assert text == trained_text(conversation, mode, prompt)
        ids = chat.encode(render(conversation, mode, generation_prompt=prompt)).ids
        assert hf.encode(text, add_special_tokens=False) == ids
        checked += 1
    assert checked == 6 * 61


def test_exported_chat_template_masks_the_tokens_megajoy_trains(tmp_path, chat_tokenizer):
    """transformers' apply_chat_template(return_assistant_tokens_mask=True), which TRL's assistant_only_loss
    trains with, marks exactly the tokens megajoy's SFT puts a loss on (reasoning, answer, tool calls and the end
    of sentence of every assistant turn) in every case of chat_template_cases. Before, the template had no
    {% generation %} block: transformers warned and masked nothing."""
    from transformers import AutoTokenizer

    from megajoy.data.chat import render
    from megajoy.data.tokenizer import write_hf_tokenizer_files

    chat, tokenizer_json, cfg = chat_tokenizer
    (tmp_path / "hf").mkdir()
    write_hf_tokenizer_files(tokenizer_json, str(tmp_path / "hf"), cfg)
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for conversation, mode, prompt in chat_template_cases():
        out = hf.apply_chat_template(conversation["messages"], tools=conversation.get("tools"), tokenize=True,
                                     add_generation_prompt=prompt, return_dict=True,
                                     return_assistant_tokens_mask=True, **thinking_kwargs(mode))
        sample = chat.encode(render(conversation, mode, generation_prompt=prompt))
        assert out["input_ids"] == sample.ids
        assert out["assistant_masks"] == [int(t) for t in sample.trained]


def openai_request(conversation) -> dict:
    """A conversation as a chat completion request gives it to llama-server: OpenAI tools and tool calls
    (arguments as JSON text; llama.cpp keeps a tool's name, description and parameters)."""
    def tool(t):
        f = t.get("function", t)
        return {"type": "function", "function": {"name": f["name"], "description": f.get("description", ""),
                                                 "parameters": f.get("parameters", {})}}

    def message(m):
        calls = [c.get("function", c) for c in m.get("tool_calls") or []]
        return dict(m, tool_calls=[{"type": "function", "function": {"name": c["name"], "arguments": json.dumps(
            c["arguments"])}} for c in calls]) if calls else m

    request = {"messages": [message(m) for m in conversation["messages"]]}
    return request | ({"tools": [tool(t) for t in conversation["tools"]]} if conversation.get("tools") else {})


def test_gguf_chat_template_serves_in_llama_cpp_as_megajoy_trains(tmp_path, chat_tokenizer):
    """The template a chat model's GGUF carries, through llama.cpp's own chat code as llama-server --jinja runs
    it: every case of chat_template_cases (as an OpenAI request; thinking through chat_template_kwargs) renders
    as the text megajoy trains on, and a reply in the form megajoy trains is parsed back into the final
    message it came from: content, reasoning and tool calls. llama.cpp detects tools, tool calls with object
    arguments and system prompts in the template. Before, every conversation with tools failed its Jinja
    ("tojson sort_keys=true not implemented"), and then llama.cpp took the template for Qwen3-Coder's (its
    source held <tool_call>, <function= and <parameter=) and refused every reply, tools or not, as "output
    that does not match the expected peg-native format": it expects Qwen's <|im_start|>assistant first."""
    import dataclasses

    from benchmarks.llama_cpp_reference import serve_chat
    from megajoy.data.chat import BOS_TOKEN, EOS_TOKEN

    llama_cpp()  # the reference code belongs with the llama.cpp tests
    _, tokenizer_json, cfg = chat_tokenizer
    export_hf(random_model(dataclasses.replace(gguf_config(), vocab_size=cfg.vocab_size), seed=3),
              tmp_path / "hf", tokenizer=tokenizer_json)
    assert convert("--input", tmp_path / "hf", "--output", tmp_path / "m.gguf", "--to", "gguf") == 0
    template = read_gguf(tmp_path / "m.gguf")[1]["tokenizer.chat_template"]
    renders = [(openai_request(conversation), mode, prompt) for conversation, mode, prompt in chat_template_cases()]
    requests = [dict(request, add_generation_prompt=prompt, chat_template_kwargs=thinking_kwargs(mode))
                for request, mode, prompt in renders]
    replies = [reply_case(conversation, mode) for conversation in chat_conversations() for mode in ("on", "off")]
    requests += [request for request, _ in replies]
    caps, answers = serve_chat(template, requests, BOS_TOKEN, EOS_TOKEN)
    assert [caps[c] for c in ("supports_tools", "supports_tool_calls", "supports_object_arguments",
                              "supports_system_role", "supports_string_content")] == [True] * 5
    assert len(answers) == 6 * 61 + 2 * 61
    for answer, (request, mode, prompt) in zip(answers, renders):
        assert answer.get("prompt") == trained_text(request, mode, prompt), answer
    for answer, (request, expected) in zip(answers[len(renders):], replies):
        assert parsed_reply(answer) == expected, (request, answer)


def reply_case(conversation, mode) -> tuple[dict, tuple]:
    """(a request for the conversation's final answer with megajoy's trained form of that answer as the model's
    output, the final message as (content, reasoning, tool calls)); llama-server stops at the end token."""
    from megajoy.data.chat import EOS_TOKEN

    request = openai_request(conversation)
    final = request["messages"][-1]
    prompt = dict(request, messages=request["messages"][:-1])
    before, whole = trained_text(prompt, mode, True), trained_text(request, mode, False)
    assert whole.startswith(before) and whole.endswith(EOS_TOKEN)
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in final.get("tool_calls", [])]
    expected = (final.get("content") or "", final.get("reasoning_content", "") if mode == "on" else "", calls)
    return dict(prompt, output=whole[len(before):-len(EOS_TOKEN)], chat_template_kwargs=thinking_kwargs(mode),
                parallel_tool_calls=True), expected


def parsed_reply(answer) -> tuple:
    message = answer.get("message", {})
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]
    return message.get("content") or "", message.get("reasoning_content", ""), calls


def test_configs_megajoy_would_read_differently_from_transformers_are_refused(hf_dir, tmp_path, capsys):
    """A config.json without a field that shapes the model (megajoy's JoyAI defaults and transformers'
    DeepSeek-V3 ones differ: n_group 1 against 8, ...), with rope_interleave false (megajoy rotates
    interleaved pairs) or unusable token ids is refused by name; without rope settings it gets the rope_theta
    transformers gives it, and without num_nextn_predict_layers no MTP layer, as transformers builds it."""
    from transformers import DeepseekV3Config

    from megajoy.ckpt.hf import model_config_from_hf

    original = json.loads((hf_dir / "config.json").read_text())
    edits = {"n_group": ({"n_group": None}, "no 'n_group'"),
             "rope_interleave": ({"rope_interleave": False}, "rope_interleave=false is not supported"),
             "eos": ({"eos_token_id": []}, "eos_token_id must be a token id"),
             "bos": ({"bos_token_id": None}, "bos_token_id must be a token id"),
             # before: "'>' not supported between instances of 'str' and 'int'", naming no field
             "eps": ({"rms_norm_eps": "small"}, "config.rms_norm_eps='small' must be a number"),
             "theta": ({"rope_theta": None}, "config.rope_theta=None must be a number"),
             "mtp": ({"num_nextn_predict_layers": None}, "config.num_nextn_predict_layers=None must be an integer")}
    for name, (edit, message) in edits.items():
        config = {k: v for k, v in {**original, **edit}.items() if not (name == "n_group" and k == "n_group")}
        (hf_dir / "config.json").write_text(json.dumps(config))
        assert convert("--input", hf_dir, "--output", tmp_path / name, "--to", "megajoy") == 2, name
        assert message in capsys.readouterr().err, name
        assert not (tmp_path / name).exists()
    (hf_dir / "config.json").write_text(json.dumps([original]))  # before: an AttributeError traceback
    assert convert("--input", hf_dir, "--output", tmp_path / "list", "--to", "megajoy") == 2
    assert "config.json: expected a JSON object of config fields, got a list" in capsys.readouterr().err
    bare = {k: v for k, v in original.items() if k not in ("rope_theta", "rope_parameters", "num_nextn_predict_layers")}
    cfg = model_config_from_hf(bare)
    assert cfg.rope_theta == DeepseekV3Config(**bare).rope_parameters["rope_theta"]  # megajoy's default is JoyAI's
    assert cfg.num_nextn_predict_layers == 0


@pytest.mark.parametrize("variant, message", [
    (dict(attention_bias=True), "has no attention biases"),
    (dict(n_shared_experts=0), "needs a shared expert in every MoE layer"),
    (dict(rope_scaling={k: v for k, v in YARN.items() if not k.startswith("mscale")}),
     "mscale None, mscale_all_dim None"),
    (dict(rope_scaling=dict(YARN, mscale=0.707)), "mscale 0.707, mscale_all_dim 1.0"),
    (dict(rope_scaling=dict(YARN, attention_factor=0.8)), "has no YaRN attention_factor")],
    ids=["attention_bias", "no_shared_expert", "yarn_without_mscale", "yarn_two_mscales", "yarn_attention_factor"])
def test_gguf_refuses_what_llama_cpp_would_compute_differently(variant, message, tmp_path, tokenizer_file, capsys):
    """Configurations llama.cpp's deepseek2 does not compute as megajoy and transformers do are refused
    before anything is written (a review found llama.cpp unable to load a file without shared experts, and
    its logits 1.5e-4 to 1.6e-3 off with YaRN unless mscale equals mscale_all_dim)."""
    export_hf(random_model(gguf_config(**variant), seed=3), tmp_path / "hf", tokenizer=tokenizer_file)
    assert convert("--input", tmp_path / "hf", "--output", tmp_path / "m.gguf", "--to", "gguf") == 2
    assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_shard_sizes_read_as_transformers_reads_them(capsys):
    """--max-shard-size takes Hugging Face's units (GB decimal, GiB binary); sizes that are not a positive
    number of bytes are an argument error, not a traceback."""
    from transformers.utils.hub import convert_file_size_to_int

    parse_size = load_tool("convert_ckpt").parse_size
    for text in ("5GB", "2GiB", "500MB", "40KB", "7MiB", "3KiB", "5Gb", "500Mb"):
        assert parse_size(text) == convert_file_size_to_int(text), text
    for text in ("infGB", "nanGB", "-5GB", "0GB", "0.5B", "lots"):
        with pytest.raises(SystemExit):
            convert("--input", "x", "--output", "y", "--to", "hf", f"--max-shard-size={text}")
        assert f"{text!r} is not a positive size" in capsys.readouterr().err
