"""Quantisation against references nobody here wrote: gguf's own quantize / dequantize (bit for bit),
compressed-tensors' int4 fake-quant, packing and config parsing, torch._scaled_mm on CPU."""

import contextlib
import json

import numpy as np
import pytest
import torch

from helpers import load_tool, random_model, small_config
from megajoy.quant.formats import WeightFormat
from megajoy.quant.fp8 import E4M3, Fp8Matmul, quantize
from megajoy.quant.pack import pack_int4, unpack_int4
from megajoy.quant.qat import check_groups, set_qat


def _weights(shape=(48, 256), seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :32] = 0.0  # an all-zero block
    w[1, 5] = 0.4  # an outlier
    return w


@pytest.mark.parametrize("name, qtype", [("q8_0", "Q8_0"), ("q4_0", "Q4_0")])
def test_ggml_grids_are_bit_exact_with_gguf(name, qtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize as gguf_quantize

    w = _weights()
    kind = getattr(GGMLQuantizationType, qtype)
    expected = dequantize(gguf_quantize(w.numpy(), kind), kind)
    fmt = WeightFormat.of(name)
    ours = fmt.fake_quant(w)
    assert np.array_equal(ours.numpy(), expected)
    codes, scales = fmt.quantize(w)
    assert scales.dtype == torch.float16 and codes.abs().max() <= (127 if name == "q8_0" else 8)


def test_int4_matches_compressed_tensors():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = _weights()
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
    groups = w.unflatten(-1, (-1, 64))
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    expected = fake_quantize(w, scale, zero, args)
    assert torch.equal(WeightFormat.of("int4", 64).fake_quant(w), expected)
    codes, scales = WeightFormat.of("int4", 64).quantize(w)
    assert torch.equal(scales, scale) and codes.min() >= -8 and codes.max() <= 7


def test_straight_through_gradient():
    w = _weights().requires_grad_()
    upstream = torch.randn_like(w)
    (WeightFormat.of("int4").fake_quant(w) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_pack_matches_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    codes = torch.randint(-8, 8, (6, 64), dtype=torch.int8)
    packed = pack_int4(codes)
    assert torch.equal(packed, pack_to_int32(codes, 4))
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size([6, 64])), codes)


def test_qat_forward_uses_exactly_the_gguf_weights():
    """With q4_0 QAT on the routed experts, the model computes what a model holding gguf's dequantised
    Q4_0 expert weights computes."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize as gguf_quantize

    cfg = small_config(hidden_size=64, moe_intermediate_size=32)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    reference = random_model(cfg)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if ".experts." in name:
                q4 = GGMLQuantizationType.Q4_0
                p.copy_(torch.from_numpy(dequantize(gguf_quantize(p.numpy(), q4), q4)).reshape(p.shape))
    assert set_qat(model, WeightFormat.of("q4_0")) == cfg.num_hidden_layers - cfg.first_k_dense_replace
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("autocast", [False, True])
def test_reused_fake_quant_trains_identically_and_quantises_once(autocast, monkeypatch):
    """Inside reuse_fake_quant() (a step's micro-batches), each weight is quantised once, and three
    micro-batches give bit for bit the losses and gradients of quantising in every forward: in fp32, and
    under bf16 autocast, where the kept weight is the bf16 tensor the GEMMs use."""
    from megajoy.quant.formats import reuse_fake_quant

    cfg = small_config(hidden_size=64, moe_intermediate_size=32)
    batches = [torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    calls = []  # the names of the weights quantised
    quantize = WeightFormat.quantize
    monkeypatch.setattr(WeightFormat, "quantize", lambda self, w: (calls.append(names[id(w)]), quantize(self, w))[1])

    def train(reuse: bool):
        model = random_model(cfg)
        set_qat(model, WeightFormat.of("int4", 32), "linear")
        names.update({id(p): n for n, p in model.named_parameters()})
        calls.clear()
        losses = []
        with reuse_fake_quant() if reuse else contextlib.nullcontext(), torch.autocast("cpu", enabled=autocast):
            for ids in batches:
                loss = model(ids, labels=torch.roll(ids, -1, 1)).lm_loss
                loss.backward()
                losses.append(loss.item())
        return losses, {n: p.grad for n, p in model.named_parameters()}, list(calls)

    names = {}
    losses, grads, every_forward = train(reuse=False)
    reused_losses, reused_grads, reused = train(reuse=True)
    assert reused_losses == losses
    assert all(torch.equal(reused_grads[n], g) for n, g in grads.items() if g is not None)
    assert sorted(every_forward) == sorted(3 * reused) and len(reused) == len(set(reused)) > 10  # each weight once


def test_quantised_rollouts_quantise_each_weight_once(monkeypatch):
    """Generation under QAT (RL's --rollout-qat) inside reuse_fake_quant(): the same tokens as quantising
    in every decoding step's forward, with one quantisation per weight for the whole rollout."""
    from megajoy.model.generate import SamplingParams, generate
    from megajoy.quant.formats import reuse_fake_quant

    cfg = small_config(hidden_size=64, moe_intermediate_size=32)
    model = random_model(cfg).eval()
    assert set_qat(model, WeightFormat.of("int4", 32), "linear") > 10
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9)]
    params = SamplingParams(12, 1.0, seed=3)
    calls = []  # the ids of the weights quantised
    quantize = WeightFormat.quantize
    monkeypatch.setattr(WeightFormat, "quantize", lambda self, w: (calls.append(id(w)), quantize(self, w))[1])
    every_step = generate(model, prompts, params)
    per_step = list(calls)
    calls.clear()
    with reuse_fake_quant():
        reused = generate(model, prompts, params)
    assert reused == every_step
    assert len(calls) == len(set(calls)) == len(set(per_step)) and set(calls) == set(per_step)  # each once
    assert len(per_step) >= 12 * len(calls)  # at least one forward per generated token


def test_reuse_steps_aside_under_torch_compile():
    """A compiled graph cannot keep a tensor between calls: inside reuse_fake_quant() a compiled QAT
    expert block quantises in its graph and computes what the eager block computes."""
    from megajoy.model.moe import GroupedExperts
    from megajoy.quant.formats import reuse_fake_quant

    experts = GroupedExperts(4, 32, 32)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    experts.weight_quant = WeightFormat.of("int4", 32).fake_quant
    x, tokens = torch.randn(10, 32), torch.tensor([3, 0, 5, 2])
    with reuse_fake_quant():
        compiled = torch.compile(experts)(x, tokens)
        compiled.sum().backward()
        eager = experts(x, tokens)
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6) and experts.gate_up_proj.grad.abs().sum() > 0


def test_groups_never_straddle_tensor_parallel_shards():
    from megajoy.config import ParallelConfig
    from megajoy.parallel.memory import rank_model

    cfg = small_config(intermediate_size=96)  # down_proj's input split over TP 2: 48 per rank
    model, _ = rank_model(cfg, ParallelConfig(tensor_model_parallel_size=2), 2, 0, 32)
    with pytest.raises(ValueError, match="layers.0.mlp.down_proj.weight: input dimension 48 on this rank is not a "
                                         "multiple of the int4 group 32"):
        check_groups(model, WeightFormat.of("int4", 32), "linear")
    check_groups(model, WeightFormat.of("int4", 32), "routed-experts")  # experts are whole on each rank


def test_int4_export_decompresses_to_the_qat_weights(tmp_path):
    """tools/convert_ckpt.py --to hf --int4: compressed-tensors reads the config, its unpacking and
    dequantisation of every expert give back exactly the weights the INT4 QAT forward used."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    from megajoy.cli import main

    ckpt = tmp_path / "ckpt"
    assert main(["init", "--set", "model.num_hidden_layers=2", "--out", str(ckpt)]) == 0
    assert load_tool("convert_ckpt").main(["--input", str(ckpt), "--output", str(tmp_path / "hf"), "--to", "hf",
                                           "--int4"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    parsed = QuantizationConfig.model_validate(config["quantization_config"])
    assert parsed.format == "pack-quantized" and parsed.config_groups["group_0"].weights.group_size == 64
    from megajoy.ckpt.native import load_model_dir

    _, state, _ = load_model_dir(str(ckpt))
    fmt = WeightFormat.of("int4", 64)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        inter = 64
        gate_up, down = state["layers.1.mlp.experts.gate_up_proj"], state["layers.1.mlp.experts.down_proj"]
        for e, proj, weight in [(3, "gate_proj", gate_up[3, :inter]), (3, "up_proj", gate_up[3, inter:]),
                                (7, "down_proj", down[7])]:
            base = f"model.layers.1.mlp.experts.{e}.{proj}"
            assert f"{base}.weight" not in keys
            scale = f.get_tensor(f"{base}.weight_scale")
            shape = torch.Size(f.get_tensor(f"{base}.weight_shape").tolist())
            codes = unpack_from_int32(f.get_tensor(f"{base}.weight_packed"), 4, shape)
            assert scale.dtype == torch.float32 and shape == weight.shape
            decompressed = (codes.float().unflatten(-1, (-1, 64)) * scale.unsqueeze(-1)).flatten(-2)
            assert torch.equal(decompressed, fmt.fake_quant(weight))
        assert f.get_tensor("model.layers.1.self_attn.o_proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.shared_experts.down_proj.weight").dtype == torch.bfloat16
    assert_every_projection_targeted_or_ignored(config["quantization_config"], keys)


def assert_every_projection_targeted_or_ignored(config: dict, tensor_names) -> None:
    """As vLLM and SGLang load a compressed-tensors checkpoint: each projection (a 2-D weight, or a packed one)
    must match a target (then it is quantised) or an ignore entry, by compressed-tensors' own name matching,
    and also vLLM's fused layers (fused_qkv_a_proj, gate_up_proj) through their shards; the routed experts
    are the targets, everything else ignored. Before, only lm_head was ignored: "Unable to find matching
    target for model.layers.0.self_attn.q_a_proj"."""
    from compressed_tensors.utils.match import match_name

    targets, ignore = config["config_groups"]["group_0"]["targets"], config["ignore"]
    fused = {"fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"], "gate_up_proj": ["gate_proj", "up_proj"]}
    layers = {n.rsplit(".", 1)[0] for n in tensor_names if n.endswith((".weight", ".weight_packed"))}
    layers = {n for n in layers if "norm" not in n and not n.endswith("embed_tokens")}
    layers |= {n.replace("q_a_proj", "fused_qkv_a_proj") for n in layers if n.endswith("q_a_proj")}
    layers |= {n.replace("gate_proj", "gate_up_proj") for n in layers if n.endswith("mlp.gate_proj")}
    assert any("experts.0.gate_proj" in n for n in layers) and any("fused_qkv_a_proj" in n for n in layers)
    for name in layers:
        targeted = any(match_name(name, t, fused) for t in targets)
        ignored = any(match_name(name, i, fused) for i in ignore)
        assert targeted != ignored and targeted == (".mlp.experts." in name), name


def _compressed_tensors_int4(directory, name: str) -> tuple[torch.Tensor, int]:
    """compressed-tensors' own decompression of an exported expert weight, and the config's group size."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    files = load_file(str(directory / "model.safetensors"))
    parts = {k.rsplit(".", 1)[1]: v for k, v in files.items() if k.startswith(name + ".")}
    return PackedQuantizationCompressor.decompress(parts, scheme)["weight"], scheme.weights.group_size


def _compressed_tensors_fake_quant(w: torch.Tensor, group: int) -> torch.Tensor:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    groups = w.unflatten(-1, (-1, group))
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    return fake_quantize(w, scale, zero, args)


def test_int4_export_uses_the_group_the_checkpoint_trained_with(tmp_path):
    """A checkpoint trained with --qat int4 --qat-group 32, exported with --int4 and no --int4-group: groups
    of 32, so compressed-tensors decompresses it to the weights of its QAT forward."""
    from megajoy.ckpt.native import load_model_dir
    from megajoy.cli import main

    ckpt = tmp_path / "ckpt"
    assert main(["init", "--set", "model.num_hidden_layers=2", "--set", "quant.qat=int4", "--set",
                 "quant.qat_group=32", "--out", str(ckpt)]) == 0
    assert load_tool("convert_ckpt").main(["--input", str(ckpt), "--output", str(tmp_path / "hf"), "--to", "hf",
                                           "--int4"]) == 0
    _, state, _ = load_model_dir(str(ckpt))
    weight = state["layers.1.mlp.experts.down_proj"][5]
    served, group = _compressed_tensors_int4(tmp_path / "hf", "model.layers.1.mlp.experts.5.down_proj")
    assert group == 32 and torch.equal(served, _compressed_tensors_fake_quant(weight, 32))


def test_int4_export_of_an_int4_checkpoint_keeps_its_weights(tmp_path):
    """INT4 in, INT4 out (same group): the packed codes and scales pass through. Quantising the dequantised
    weights again would move them (a group's largest value comes back as 7 or 8 steps, not 7.5)."""
    from megajoy.ckpt.native import load_model_dir
    from megajoy.cli import main

    convert = load_tool("convert_ckpt").main
    ckpt, first, second = tmp_path / "ckpt", tmp_path / "int4", tmp_path / "again"
    assert main(["init", "--set", "model.num_hidden_layers=2", "--out", str(ckpt)]) == 0
    assert convert(["--input", str(ckpt), "--output", str(first), "--to", "hf", "--int4"]) == 0
    assert convert(["--input", str(first), "--output", str(second), "--to", "hf", "--int4"]) == 0
    _, state, _ = load_model_dir(str(ckpt))
    inter = state["layers.1.mlp.experts.down_proj"].shape[-1]
    for e, proj, weight in [(2, "gate_proj", state["layers.1.mlp.experts.gate_up_proj"][2, :inter]),
                            (6, "down_proj", state["layers.1.mlp.experts.down_proj"][6])]:
        name = f"model.layers.1.mlp.experts.{e}.{proj}"
        served, group = _compressed_tensors_int4(second, name)
        assert group == 64 and torch.equal(served, _compressed_tensors_fake_quant(weight, 64)), name


def test_int4_group_alone_asks_for_the_int4_export(tmp_path, capsys):
    """--int4-group without --int4 exports INT4 in that group (before, it was dropped: a bf16 export without
    a word); with --to gguf it is refused, as --int4 is."""
    from megajoy.ckpt.native import load_model_dir
    from megajoy.cli import main

    convert = load_tool("convert_ckpt").main
    ckpt = tmp_path / "ckpt"
    assert main(["init", "--set", "model.num_hidden_layers=2", "--out", str(ckpt)]) == 0
    assert convert(["--input", str(ckpt), "--output", str(tmp_path / "hf"), "--to", "hf", "--int4-group", "32"]) == 0
    weight = load_model_dir(str(ckpt))[1]["layers.1.mlp.experts.down_proj"][3]
    served, group = _compressed_tensors_int4(tmp_path / "hf", "model.layers.1.mlp.experts.3.down_proj")
    assert group == 32 and torch.equal(served, _compressed_tensors_fake_quant(weight, 32))
    assert convert(["--input", str(ckpt), "--output", str(tmp_path / "m.gguf"), "--to", "gguf", "--int4-group",
                    "32"]) == 2
    assert "--int4 and --int4-group apply to --to hf" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_int4_export_of_an_int4_checkpoint_keeps_its_group(tmp_path, capsys):
    """INT4 in groups of 32 or 16, exported with --int4 and no group: the input's groups, its packed codes and
    scales unchanged (before, re-quantised in groups of 64 without a word). Asking for another group re-quantises,
    with a note."""
    from safetensors.torch import load_file

    from megajoy.ckpt.hf import save_hf_dir
    from megajoy.ckpt.native import load_model_dir
    from megajoy.ckpt.view import open_view
    from megajoy.cli import main

    convert = load_tool("convert_ckpt").main
    ckpt = tmp_path / "ckpt"
    assert main(["init", "--set", "model.num_hidden_layers=2", "--out", str(ckpt)]) == 0
    weight = load_model_dir(str(ckpt))[1]["layers.1.mlp.experts.down_proj"][6]
    name = "model.layers.1.mlp.experts.6.down_proj"
    for group in (32, 16):
        first, second = tmp_path / f"int4_{group}", tmp_path / f"again_{group}"
        save_hf_dir(str(first), open_view(str(ckpt)), int4_group=group)
        assert convert(["--input", str(first), "--output", str(second), "--to", "hf", "--int4"]) == 0
        assert "re-quantised" not in capsys.readouterr().err
        served, served_group = _compressed_tensors_int4(second, name)
        assert served_group == group and torch.equal(served, _compressed_tensors_fake_quant(weight, group))
        before, after = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
        assert all(torch.equal(after[k], v) for k, v in before.items() if ".mlp.experts." in k)
    assert convert(["--input", str(tmp_path / "int4_32"), "--output", str(tmp_path / "64"), "--to", "hf",
                    "--int4-group", "64"]) == 0
    assert "holds its routed experts as INT4 in groups of 32: re-quantised in groups of 64" in capsys.readouterr().err
    assert _compressed_tensors_int4(tmp_path / "64", name)[1] == 64


def test_fp8_emulation_equals_scaled_mm_on_cpu():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=g), torch.randn(96, 256, generator=g)
    x8, sx = quantize(x, E4M3, False)
    w8, sw = quantize(w, E4M3, False)
    expected = torch._scaled_mm(x8, w8.t(), scale_a=sx.reshape(()), scale_b=sw.reshape(()), out_dtype=torch.float32)
    assert torch.equal(Fp8Matmul("tensorwise", "emulate").linear(x, w), expected)


def test_torch_fp8_backend_equals_the_emulation_at_40_tokens():
    """The torch back-end's three _scaled_mm GEMMs (GPU-only in training), run on CPU, give the emulate
    back-end's output and gradients to its bf16 outputs' rounding, at a token count that is not a multiple
    of 16 (a GPU's _scaled_mm wants one for the weight gradient's inner dimension: it is zero-padded)."""
    from megajoy.quant.fp8 import E5M2, _ScaledMmLinear

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 128, generator=g, requires_grad=True), torch.randn(96, 128, generator=g, requires_grad=True)
    grad = torch.randn(40, 96, generator=g)
    got = [_ScaledMmLinear.apply(x, w, E5M2)]
    got += torch.autograd.grad(got[0], (x, w), grad)
    want = [Fp8Matmul("tensorwise", "emulate").linear(x, w)]
    want += torch.autograd.grad(want[0], (x, w), grad)
    for a, b in zip(got, want):
        assert ((a - b).norm() / b.norm()).item() <= 4e-3


def test_fp8_gradients_round_through_fp8():
    x = torch.randn(8, 256, requires_grad=True)
    w = torch.randn(128, 256, requires_grad=True)
    for recipe in ("tensorwise", "blockwise"):
        y = Fp8Matmul(recipe, "emulate").linear(x, w)
        grad = torch.randn_like(y)
        dx, dw = torch.autograd.grad(y, (x, w), grad)
        reference_dx = grad @ w  # full precision: FP8 rounding makes the gradient differ a little
        rel = ((dx - reference_dx).norm() / reference_dx.norm()).item()
        assert 1e-4 < rel < 0.1


def _fp8_experts(num_experts: int, weights: tuple[torch.Tensor, torch.Tensor]):
    from megajoy.model.moe import GroupedExperts

    experts = GroupedExperts(num_experts, 64, 32)
    with torch.no_grad():
        experts.gate_up_proj.copy_(weights[0])
        experts.down_proj.copy_(weights[1])
    experts.matmul = Fp8Matmul("tensorwise", "emulate")
    return experts


def _fp8_routing(rank: int):
    """Rank `rank`'s tokens, all routed to experts 0 and 1 (rank 0's under expert parallelism over 2 ranks)."""
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(6, 64, generator=g), torch.randint(0, 2, (6, 2), generator=g), torch.rand(6, 2, generator=g)


def _fp8_expert_weights():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 64, 64, generator=g) * 0.1, torch.randn(4, 64, 32, generator=g) * 0.1


def _fp8_expert_parallel_worker(rank, world):
    import torch.distributed as dist

    from megajoy.launch import init_distributed, launch_env
    from megajoy.parallel.expert_parallel import ExpertParallelDispatcher

    init_distributed(launch_env())
    gate_up, down = _fp8_expert_weights()
    experts = _fp8_experts(2, (gate_up[2 * rank:2 * rank + 2], down[2 * rank:2 * rank + 2]))
    x, ids, weights = _fp8_routing(rank)
    x.requires_grad_()
    dispatcher = ExpertParallelDispatcher(4, dist.group.WORLD)
    x_local, counts, meta = dispatcher.dispatch(x, ids)
    y = dispatcher.combine(experts(x_local, counts), weights, meta)
    y.sum().backward()
    return y.detach(), x.grad, experts.gate_up_proj.grad, experts.down_proj.grad, int(counts.sum())


def test_fp8_tensorwise_experts_on_a_rank_that_receives_no_tokens():
    """Expert parallelism over 2 ranks with every token routed to rank 0's experts: rank 1's grouped GEMM
    gets no rows (before, tensorwise scaling took amax of an empty tensor and raised). Each rank's output and
    gradients equal one process running all 4 experts on both ranks' tokens; rank 1's experts get zero
    gradients."""
    from megajoy.model.moe import TokenDispatcher
    from megajoy.parallel.spawn import run_workers

    results = run_workers(2, _fp8_expert_parallel_worker)
    assert [r[4] for r in results] == [24, 0]
    inputs = [_fp8_routing(rank) for rank in range(2)]
    x = torch.cat([i[0] for i in inputs]).requires_grad_()
    ids, weights = torch.cat([i[1] for i in inputs]), torch.cat([i[2] for i in inputs])
    experts = _fp8_experts(4, _fp8_expert_weights())
    dispatcher = TokenDispatcher(4)
    x_perm, counts, meta = dispatcher.dispatch(x, ids)
    y = dispatcher.combine(experts(x_perm, counts), weights, meta)
    y.sum().backward()
    for rank, (y_rank, x_grad, gate_up_grad, down_grad, _) in enumerate(results):
        rows = slice(6 * rank, 6 * rank + 6)
        torch.testing.assert_close(y_rank, y[rows].detach())
        torch.testing.assert_close(x_grad, x.grad[rows])
        torch.testing.assert_close(gate_up_grad, experts.gate_up_proj.grad[2 * rank:2 * rank + 2])
        torch.testing.assert_close(down_grad, experts.down_proj.grad[2 * rank:2 * rank + 2])
    assert experts.down_proj.grad[:2].abs().sum() > 0 and results[1][3].abs().sum() == 0


def _fp8_mlp_tensors():
    """An MLP-shaped pair of weights whose halves have different maxima, and an input."""
    g = torch.Generator().manual_seed(4)
    w1, w2 = torch.randn(64, 32, generator=g), torch.randn(32, 64, generator=g)
    w1[3, 7], w2[5, 40] = 9.0, -7.0  # outliers in one shard only (rank 0's rows of w1, rank 1's columns of w2)
    return torch.randn(2, 6, 32, generator=g), w1, w2


def _fp8_mlp(x, first, second, sp, group=None):
    from megajoy.parallel.mappings import enter_tp

    y = second.forward_exit(torch.relu(first(enter_tp(x, group, sp))), sp)
    return y


def _fp8_tensor_parallel_worker(rank, world, sp):
    import torch.distributed as dist

    from megajoy.launch import init_distributed, launch_env
    from megajoy.parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megajoy.parallel.mappings import gather_along, split_along

    init_distributed(launch_env())
    group = dist.group.WORLD
    x, w1, w2 = _fp8_mlp_tensors()
    first, second = ColumnParallelLinear(32, 64, group), RowParallelLinear(64, 32, group)
    with torch.no_grad():
        first.weight.copy_(w1.chunk(world, 0)[rank])
        second.weight.copy_(w2.chunk(world, 1)[rank])
    first.matmul = second.matmul = Fp8Matmul("tensorwise", "emulate")
    x.requires_grad_()
    y = _fp8_mlp(split_along(x, group, 1) if sp else x, first, second, sp, group)
    y = gather_along(y, group, 1, grad_is_partial=False) if sp else y
    (y * torch.linspace(-1, 3, 32)).sum().backward()
    return y.detach(), x.grad, first.weight.grad, second.weight.grad


@pytest.mark.parametrize("sp", [False, True])
def test_fp8_tensorwise_scales_cover_the_whole_tensor_under_tensor_parallelism(sp):
    """TP 2 (with and without sequence parallelism) gives the single process's FP8 output and gradients: a
    sharded operand's scale is the whole tensor's. Before, each rank scaled its own shard, so the rank
    without the outlier rounded its half of the weight (and of the row-parallel input) more finely."""
    from megajoy.parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megajoy.parallel.spawn import run_workers

    results = run_workers(2, _fp8_tensor_parallel_worker, sp)
    x, w1, w2 = _fp8_mlp_tensors()
    first, second = ColumnParallelLinear(32, 64), RowParallelLinear(64, 32)
    with torch.no_grad():
        first.weight.copy_(w1)
        second.weight.copy_(w2)
    first.matmul = second.matmul = Fp8Matmul("tensorwise", "emulate")
    x.requires_grad_()
    y = _fp8_mlp(x, first, second, sp=False)
    (y * torch.linspace(-1, 3, 32)).sum().backward()
    unrounded = torch.relu(x.detach() @ w1.T) @ w2.T
    assert (y - unrounded).norm() / unrounded.norm() > 1e-3  # FP8 rounding is there to be matched
    for rank, (y_tp, x_grad, w1_grad, w2_grad) in enumerate(results):
        torch.testing.assert_close(y_tp, y.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_grad, x.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w1_grad, first.weight.grad.chunk(2, 0)[rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w2_grad, second.weight.grad.chunk(2, 1)[rank], rtol=1e-5, atol=1e-5)


def test_fp8_blockwise_tiles_never_straddle_tensor_parallel_shards():
    from megajoy.config import ParallelConfig
    from megajoy.parallel.memory import rank_model
    from megajoy.quant.qat import set_fp8

    model, _ = rank_model(small_config(), ParallelConfig(tensor_model_parallel_size=2), 2, 0, 32)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_b_proj\.weight: \d+ output features on this "
                                         "rank are not whole 128-wide FP8 blocks"):
        set_fp8(model, Fp8Matmul("blockwise", "emulate"))
    assert set_fp8(model, Fp8Matmul("tensorwise", "emulate")) > 0
    single, _ = rank_model(small_config(), ParallelConfig(), 1, 0, 32)
    assert set_fp8(single, Fp8Matmul("blockwise", "emulate")) > 0  # whole tensors: partial edge tiles are fine


def test_qat_of_te_projections_is_refused():
    """Transformer Engine's Linear takes its weight as its own parameter, so a fake-quantised weight would
    get the gradient and the real one none: refused by name; the routed experts (not TE GEMMs) are fine."""
    from megajoy.config import QuantConfig

    with pytest.raises(ValueError, match="qat_modules='linear' with fp8_backend=te is not supported"):
        QuantConfig(qat="int4", qat_modules="linear", fp8="tensorwise", fp8_backend="te")
    assert QuantConfig(qat="int4", qat_modules="routed-experts", fp8="tensorwise", fp8_backend="te").qat == "int4"
    assert QuantConfig(qat="int4", qat_modules="experts", fp8="tensorwise", fp8_backend="torch").qat == "int4"


@pytest.mark.parametrize("backend, recipe, message", [
    ("te", "tensorwise", "Transformer Engine, which is not installed"),
    ("torch", "tensorwise", "needs a CUDA GPU with FP8 units"),
])
def test_unavailable_fp8_backends_say_so(backend, recipe, message):
    if backend == "torch" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=message):
        Fp8Matmul(recipe, backend)


def _train(tmp_path, data_prefix, tokenizer_file, name, *flags):
    from megajoy.cli import main

    out = tmp_path / name
    argv = ["pretrain", "--preset", "tiny", "--data-path", data_prefix, "--tokenizer", tokenizer_file,
            "--seq-length", "64", "--global-batch-size", "4", "--micro-batch-size", "4", "--train-iters", "40",
            "--eval-interval", "40", "--eval-iters", "4", "--log-interval", "1", "--lr-warmup-iters", "5",
            "--mtp-start-iter", "0", "--out", str(out), *flags]
    assert main(argv) == 0
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_precision_run(tmp_path_factory, data_prefix, tokenizer_file):
    return _train(tmp_path_factory.mktemp("quant"), data_prefix, tokenizer_file, "full")


def test_tiny_preset_trains_within_six_percent_with_int4_qat_and_fp8(tmp_path, data_prefix, tokenizer_file,
                                                                     full_precision_run):
    def final_val(records):
        return [r["val_loss"] for r in records if "val_loss" in r][-1]

    full = full_precision_run
    start = [r["val_loss"] for r in full if "val_loss" in r][0]
    assert final_val(full) < 0.7 * start  # it learns, so the comparison means something
    for name, flags in (("int4", ["--qat", "int4"]), ("fp8_tensorwise", ["--fp8", "tensorwise", "--fp8-backend", "emulate"]),
                        ("fp8_blockwise", ["--fp8", "blockwise", "--fp8-backend", "emulate"])):
        quantised = final_val(_train(tmp_path, data_prefix, tokenizer_file, name, *flags))
        assert abs(quantised / final_val(full) - 1) <= 0.06, (name, quantised, final_val(full))


def test_qat_switches_on_at_its_step(tmp_path, data_prefix, tokenizer_file, full_precision_run):
    plain = {r["step"]: r["loss"] for r in full_precision_run if "loss" in r}
    late = {r["step"]: r["loss"] for r in _train(tmp_path, data_prefix, tokenizer_file, "late", "--qat", "q8_0",
                                                 "--qat-start-iter", "10", "--exit-interval", "13") if "loss" in r}
    assert sorted(late) == list(range(1, 14))
    assert all(late[s] == plain[s] for s in range(1, 11))  # steps 0..9 run full precision
    assert all(late[s] != plain[s] for s in range(11, 14))
