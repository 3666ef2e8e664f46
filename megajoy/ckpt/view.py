"""A checkpoint's tensors in megajoy's terms, read lazily, whatever kind of checkpoint holds them.

Every converter reads through a `CheckpointView` and every writer takes one, so each output format is
written once for all inputs: a megajoy model directory, a training checkpoint (distributed, any
layout), a Hugging Face DeepSeek-V3-family directory (bf16, fp8 block-quantised as DeepSeek-V3 ships,
or compressed-tensors INT4 as `--to hf --int4` writes), or a state dict in memory.

A view serves the non-expert tensors under their megajoy names (`dense_names`) and the routed experts
one matrix at a time (`expert(layer, e, proj)`), so no reader ever holds a whole layer's experts.
Opening a view checks every tensor against the config: missing, unknown or mis-shaped tensors are
reported by the name they have in the input.
"""

import dataclasses
import json
import os
import re
from collections.abc import Mapping

import torch

from megajoy.ckpt import hf as names
from megajoy.ckpt.safetensors_io import DTYPE_CODES, SafetensorsDir
from megajoy.config import JobConfig, ModelConfig

PROJS = ("gate_proj", "up_proj", "down_proj")
_STACKED = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)"
                        r"\.(weight|weight_packed|weight_scale|weight_shape|weight_scale_inv)$")


class CheckpointView:
    job: JobConfig
    tokenizer: str | None
    source: str
    notes: tuple[str, ...] = ()  # for the user: what the conversion reads differently from the input's config

    @property
    def cfg(self) -> ModelConfig:
        return self.job.model

    def dense_names(self) -> list[str]:
        raise NotImplementedError

    def dense_shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dense(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def expert(self, layer: int, e: int, proj: str) -> torch.Tensor:
        raise NotImplementedError

    def display_name(self, name: str) -> str:
        """How the input calls a megajoy tensor, for error messages."""
        return name

    def expert_int4(self, layer: int, e: int, proj: str, group: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(int4 codes, scales) where the input stores this expert packed INT4 in groups of `group`, else None."""
        return None

    def int4_group(self) -> int | None:
        """The group size of the input's packed INT4 experts, if it stores them so."""
        return None

    def served(self, name: str) -> torch.Tensor:
        """A tensor as engines that always pick experts by score + bias (transformers, llama.cpp, vLLM) must
        read it: under topk_method greedy, which picks by score alone, the router bias is zero."""
        tensor = self.dense(name)
        if name.endswith("e_score_correction_bias") and self.cfg.topk_method == "greedy":
            return torch.zeros_like(tensor)
        return tensor

    # ---- shared

    def moe_layers(self) -> list[int]:
        return list(range(self.cfg.first_k_dense_replace, self.cfg.num_hidden_layers))

    def expert_shape(self, proj: str) -> tuple[int, int]:
        inter, hidden = self.cfg.moe_intermediate_size, self.cfg.hidden_size
        return (hidden, inter) if proj == "down_proj" else (inter, hidden)

    def check(self) -> "CheckpointView":
        """Every non-expert tensor the config implies is here, with its shape, and nothing else."""
        expected = expected_dense_shapes(self.cfg)
        present = self.dense_names()
        missing = [n for n in expected if n not in present]
        if missing:
            raise ValueError(f"{self.source}: {len(missing)} tensor(s) missing, first "
                             f"{self.display_name(missing[0])!r}")
        for name in present:
            if name not in expected:
                raise ValueError(f"{self.source}: unknown tensor {self.display_name(name)!r} (not part of a "
                                 f"model with this config)")
            shape = tuple(self.dense_shape(name))
            if shape != expected[name]:
                raise ValueError(f"{self.source}: tensor {self.display_name(name)!r} has shape {shape}, the "
                                 f"config expects {expected[name]}")
        return self

    def full_state(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Everything in memory under megajoy's names (experts stacked): for small models and tests."""
        state = {n: _cast(n, self.dense(n), dtype) for n in self.dense_names()}
        for layer in self.moe_layers():
            experts = range(self.cfg.n_routed_experts)
            gate_up = torch.stack([torch.cat([self.expert(layer, e, "gate_proj"), self.expert(layer, e, "up_proj")])
                                   for e in experts])
            state[f"layers.{layer}.mlp.experts.gate_up_proj"] = _cast("", gate_up, dtype)
            state[f"layers.{layer}.mlp.experts.down_proj"] = _cast(
                "", torch.stack([self.expert(layer, e, "down_proj") for e in experts]), dtype)
        return state


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.float() if name.endswith("e_score_correction_bias") else tensor.to(dtype)


def expected_dense_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Non-expert tensors of a model with this config (from a meta-device model: no memory)."""
    from megajoy.model.stats import meta_model

    state = meta_model(cfg).state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {n: tuple(t.shape) for n, t in state.items() if not _STACKED.match(n)}


# ------------------------------------------------------------------------------------------ megajoy

class MegajoyView(CheckpointView):
    """Tensors under megajoy's names, experts stacked per layer, from a store: a model directory
    (safetensors), a training checkpoint (distributed, any layout) or a state dict in memory."""

    def __init__(self, job: JobConfig, store, tokenizer: str | None, source: str):
        self.job, self.store, self.tokenizer, self.source = job, store, tokenizer, source

    @classmethod
    def open(cls, directory: str) -> "MegajoyView":
        from megajoy.ckpt import distributed as dcp_io
        from megajoy.ckpt.native import TOKENIZER_NAME, read_job_config

        if dcp_io.is_distributed_checkpoint(directory):
            dcp_io.verify_checksums(directory)
            store = DcpStore(directory)
        else:
            store = SafetensorsDir(directory)
        tokenizer = os.path.join(directory, TOKENIZER_NAME)
        return cls(read_job_config(directory), store, tokenizer if os.path.exists(tokenizer) else None, directory)

    def check(self) -> "MegajoyView":
        cfg = self.cfg
        inter, hidden, n = cfg.moe_intermediate_size, cfg.hidden_size, cfg.n_routed_experts
        for layer in self.moe_layers():
            for kind, shape in (("gate_up_proj", (n, 2 * inter, hidden)), ("down_proj", (n, hidden, inter))):
                name = f"layers.{layer}.mlp.experts.{kind}"
                if name not in self.store.weight_map:
                    raise ValueError(f"{self.source}: tensor {name!r} missing")
                if tuple(self.store.shape(name)) != shape:
                    raise ValueError(f"{self.source}: tensor {name!r} has shape {tuple(self.store.shape(name))}, "
                                     f"the config expects {shape}")
        for name in self.store.weight_map:
            m = _STACKED.match(name)
            if m and int(m.group(1)) not in self.moe_layers():
                raise ValueError(f"{self.source}: unknown tensor {name!r} (a layer without routed experts)")
            _check_tensor(f"{self.source}: tensor {name!r}", self.store.dtype(name), FLOATING)
        return super().check()

    def dense_names(self) -> list[str]:
        return [n for n in self.store.weight_map if not _STACKED.match(n)]

    def dense_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.store.shape(name))

    def dense(self, name: str) -> torch.Tensor:
        return self.store.load(name)

    def expert(self, layer: int, e: int, proj: str) -> torch.Tensor:
        inter = self.cfg.moe_intermediate_size
        if proj == "down_proj":
            return self.store.load_rows(f"layers.{layer}.mlp.experts.down_proj", e, e + 1)[0]
        rows = self.store.load_rows(f"layers.{layer}.mlp.experts.gate_up_proj", e, e + 1)[0]
        return rows[:inter] if proj == "gate_proj" else rows[inter:]


def state_view(job: JobConfig | ModelConfig, state: Mapping[str, torch.Tensor], tokenizer: str | None = None,
               source: str = "state dict") -> MegajoyView:
    """A view of a full megajoy state dict in memory (what a trainer or a test holds)."""
    job = job if isinstance(job, JobConfig) else JobConfig(model=job)
    if job.model.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    return MegajoyView(job, MemoryStore(state), tokenizer, source)


class MemoryStore:
    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = state
        self.weight_map = dict.fromkeys(state, "memory")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def load(self, name: str) -> torch.Tensor:
        return self.state[name]

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.state[name][start:stop]


class DcpStore:
    """Whole tensors of a distributed checkpoint, one at a time. A distributed checkpoint stores each
    rank's shards as separate records, so reading rows of a stacked expert tensor reads the whole
    tensor once and keeps it until another tensor is asked for."""

    PREFIX = "model."

    def __init__(self, path: str):
        from torch.distributed.checkpoint import FileSystemReader

        self.path = path
        self.metadata = FileSystemReader(path).read_metadata().state_dict_metadata
        self.meta = {k[len(self.PREFIX):]: v for k, v in self.metadata.items() if k.startswith(self.PREFIX)}
        self.weight_map = dict.fromkeys(self.meta, path)
        self._cached: tuple[str, torch.Tensor] | None = None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.meta[name].size)

    def dtype(self, name: str) -> torch.dtype:
        return self.meta[name].properties.dtype

    def load(self, name: str) -> torch.Tensor:
        from megajoy.ckpt.distributed import read_full_tensors

        if self._cached is not None and self._cached[0] == name:
            return self._cached[1]
        self._cached = None  # release before reading the next one
        tensor = read_full_tensors(self.path, names=[name], metadata=self.metadata)[name]
        self._cached = (name, tensor)
        return tensor

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.load(name)[start:stop]


# ------------------------------------------------------------------------------------------ Hugging Face

class HfView(CheckpointView):
    """A Hugging Face DeepSeek-V3-family directory: config.json plus (sharded) safetensors."""

    def __init__(self, directory: str):
        path = os.path.join(directory, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{directory} is not a Hugging Face model directory: config.json is missing")
        try:
            with open(path) as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        self.source = directory
        self.job = JobConfig(model=names.model_config_from_hf(config, source=path))
        self.quant = _quantization(config.get("quantization_config"), path)
        self.files = SafetensorsDir(directory)
        tokenizer = os.path.join(directory, "tokenizer.json")
        self.tokenizer = tokenizer if os.path.exists(tokenizer) else None
        self._dense: dict[str, str] = {}  # megajoy name -> Hugging Face name
        self._experts: dict[tuple[int, int, str], dict[str, str]] = {}
        for hf_name in self.files.names():
            self._classify(hf_name)
        if self.cfg.num_nextn_predict_layers and not any(name.startswith("mtp.") for name in self._dense):
            self._without_mtp()
        self._check_experts()

    def _without_mtp(self) -> None:
        """transformers builds and saves no MTP layer, yet keeps num_nextn_predict_layers (1 by default) in
        the config it saves: such a directory converts without MTP, as transformers loads it."""
        n = self.cfg.num_nextn_predict_layers
        self.job = dataclasses.replace(self.job, model=dataclasses.replace(self.cfg, num_nextn_predict_layers=0))
        self.notes = (f"{self.source}: config.json sets num_nextn_predict_layers={n} but the weights hold no MTP "
                      "layer (transformers saves none): converted without MTP",)

    def _classify(self, hf_name: str) -> None:
        m = _HF_EXPERT.match(hf_name)
        if m:
            layer, e, proj, part = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            self._experts.setdefault((layer, e, proj), {})[part] = hf_name
            return
        if hf_name.endswith("_scale_inv") and self.quant.get("method") == "fp8":
            return  # read beside its weight
        name = names.from_hf_name(hf_name, self.cfg)
        if name is not None:
            self._expect(hf_name, FLOATING)
            self._dense[name] = hf_name

    def _check_experts(self) -> None:
        cfg, n = self.cfg, self.cfg.n_routed_experts
        moe = set(self.moe_layers())
        for (layer, e, proj), parts in self._experts.items():
            if layer not in moe or e >= n:
                first = next(iter(parts.values()))
                raise ValueError(f"{self.source}: unknown tensor {first!r} (n_routed_experts={n}, layers "
                                 f"{cfg.first_k_dense_replace}..{cfg.num_hidden_layers - 1} have experts)")
        for layer in sorted(moe):
            for e in range(n):
                for proj in PROJS:
                    prefix = f"model.layers.{layer}.mlp.experts.{e}.{proj}."
                    self._check_expert(prefix, self._experts.get((layer, e, proj), {}), self.expert_shape(proj))

    def _check_expert(self, prefix: str, parts: dict[str, str], expected: tuple[int, int]) -> None:
        """A floating `weight` of the config's shape, or the parts of an int4 one."""
        if "weight" in parts:
            self._expect(parts["weight"], FLOATING, [expected])
        elif parts.keys() & set(INT4_PARTS):
            self._check_int4(prefix, parts, expected)
        else:
            raise ValueError(f"{self.source}: tensor {prefix + 'weight'!r} missing")

    def _check_int4(self, prefix: str, parts: dict[str, str], expected: tuple[int, int]) -> None:
        """compressed-tensors pack-quantized: weight_shape [rows, cols], weight_packed int32 [rows, cols / 8]
        (8 codes a word), weight_scale [rows, cols / group], group the quantization_config's group_size."""
        missing = [part for part in INT4_PARTS if part not in parts]
        if missing:
            raise ValueError(f"{self.source}: tensor {prefix + missing[0]!r} missing (an int4 expert has "
                             f"{', '.join(INT4_PARTS)})")
        if self.quant.get("method") != "int4":
            raise ValueError(f"{self.source}: int4 expert {prefix + 'weight_packed'!r}, but config.json has no "
                             f"compressed-tensors pack-quantized quantization_config")
        rows, cols, group = *expected, self.quant["group"]
        if cols % group or cols % 8:
            raise ValueError(f"{self.source}: int4 expert {prefix + 'weight_packed'!r}: its input dimension {cols} "
                             f"is not a multiple of quantization_config's group_size {group} (and of 8)")
        shape_name, packed, scale = (parts[part] for part in INT4_PARTS)
        self._expect(shape_name, ("I64", "I32"), [(2,)])
        stored = tuple(int(x) for x in self.files.load(shape_name).tolist())
        if stored != expected:
            raise ValueError(f"{self.files.path(shape_name)}: tensor {shape_name!r} holds {stored}, the config "
                             f"expects {expected}")
        self._expect(packed, ("I32",), [(rows, cols // 8)])
        self._expect(scale, FLOATING, [(rows, cols // group)])

    def _expect(self, hf_name: str, codes: tuple[str, ...], shapes: list[tuple[int, ...]] | None = None) -> None:
        _check_tensor(f"{self.files.path(hf_name)}: tensor {hf_name!r}", self.files.dtype(hf_name), codes,
                      tuple(self.files.shape(hf_name)), shapes)

    def dense_names(self) -> list[str]:
        return list(self._dense)

    def display_name(self, name: str) -> str:
        return self._dense.get(name) or names.to_hf_name(name, self.cfg)

    def dense_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.files.shape(self._dense[name]))

    def dense(self, name: str) -> torch.Tensor:
        return self._read_weight(self._dense[name])

    def expert(self, layer: int, e: int, proj: str) -> torch.Tensor:
        parts = self._experts[(layer, e, proj)]
        if "weight" in parts:
            return self._read_weight(parts["weight"])
        return self._unpack_int4(parts)

    def _read_weight(self, hf_name: str) -> torch.Tensor:
        tensor = self.files.load(hf_name)
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = hf_name + "_scale_inv"
            if scale_name not in self.files.weight_map:
                raise ValueError(f"{self.source}: fp8 tensor {hf_name!r} has no {scale_name!r}")
            self._expect(scale_name, FLOATING)
            return _dequantize_fp8_blocks(tensor, self.files.load(scale_name), self.quant["block"], hf_name)
        return tensor

    def int4_group(self) -> int | None:
        return self.quant["group"] if self.quant.get("method") == "int4" else None

    def expert_int4(self, layer: int, e: int, proj: str, group: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        parts = self._experts[(layer, e, proj)]
        if "weight" in parts:
            return None
        return self._int4_parts(parts) if group == self.quant["group"] else None

    def _unpack_int4(self, parts: dict[str, str]) -> torch.Tensor:
        from megajoy.quant.formats import WeightFormat

        codes, scales = self._int4_parts(parts)
        return WeightFormat("int4", self.quant["group"]).dequantize(codes, scales)  # any group size reads

    def _int4_parts(self, parts: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
        from megajoy.quant.pack import unpack_int4

        return unpack_int4(self.files.load(parts["weight_packed"])), self.files.load(parts["weight_scale"])


def _quantization(config: dict | None, source: str) -> dict:
    if not config:
        return {}
    method = config.get("quant_method")
    if method == "fp8":
        return {"method": "fp8", "block": tuple(config.get("weight_block_size") or (128, 128))}
    if method == "compressed-tensors" and config.get("format") == "pack-quantized":
        return {"method": "int4", "group": _int4_group_size(config, source)}
    raise ValueError(f"{source}: quantization_config with quant_method={method!r} is not supported (bf16/fp16/"
                     f"fp32, fp8 with block scales, or compressed-tensors pack-quantized INT4 are)")


def _int4_group_size(config: dict, source: str) -> int:
    """The group size of a compressed-tensors checkpoint whose every config group is what megajoy reads:
    symmetric static 4-bit integers in groups along the input, one group size for all."""
    wanted = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "dynamic": False}
    sizes = set()
    for name, group in (config.get("config_groups") or {}).items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            raise ValueError(f"{source}: quantization_config.config_groups.{name} has no weights")
        for field, value in wanted.items():
            if weights.get(field, value if field == "dynamic" else None) != value:
                raise ValueError(f"{source}: quantization_config.config_groups.{name}.weights.{field}="
                                 f"{weights.get(field)!r} is not supported (megajoy reads {wanted})")
        if weights.get("actorder"):
            raise ValueError(f"{source}: quantization_config.config_groups.{name}.weights.actorder="
                             f"{weights['actorder']!r} is not supported")
        sizes.add(weights.get("group_size"))
    if len(sizes) != 1 or not all(isinstance(g, int) and g > 0 for g in sizes):
        raise ValueError(f"{source}: quantization_config needs one positive group_size for its INT4 groups, "
                         f"got {sorted(map(str, sizes))}")
    return sizes.pop()


def _dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                           name: str) -> torch.Tensor:
    """DeepSeek-V3's fp8 checkpoints: one fp32 scale per [128 x 128] block, weight = fp8 * scale."""
    rows, cols = weight.shape
    expected = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"{name}_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
                         f"{tuple(weight.shape)} weight in blocks of {block}")
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


INT4_PARTS = ("weight_shape", "weight_packed", "weight_scale")
FLOATING = tuple(code for dtype, code in DTYPE_CODES.items() if dtype.is_floating_point)


def _check_tensor(where: str, dtype: torch.dtype, codes: tuple[str, ...], shape: tuple[int, ...] = (),
                  shapes: list[tuple[int, ...]] | None = None) -> None:
    """Refuse a tensor (`where` names it) unless its dtype is one of `codes` and, given `shapes`, its shape one
    of them: an integer tensor where a weight belongs would otherwise be cast to garbage without a word."""
    code = DTYPE_CODES.get(dtype, str(dtype))
    if code not in codes:
        wanted = f"a floating-point dtype ({', '.join(codes)})" if codes == FLOATING else " or ".join(codes)
        raise ValueError(f"{where} has dtype {code}, expected {wanted}")
    if shapes is not None and shape not in shapes:
        raise ValueError(f"{where} has shape {shape}, expected {' or '.join(map(str, shapes))}")


# ------------------------------------------------------------------------------------------ opening

def open_view(path: str) -> CheckpointView:
    """The view of `path`: a megajoy checkpoint, a `megajoy pretrain --out` directory (its latest
    checkpoint) or a Hugging Face directory; checked against its config before anything is read."""
    from megajoy.ckpt.native import CONFIG_NAME
    from megajoy.train.checkpoint import latest_checkpoint

    if not os.path.isdir(path):
        raise FileNotFoundError(f"input {path} does not exist or is not a directory")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"{path}: a training output directory without any complete checkpoint")
        path = latest
    if os.path.exists(os.path.join(path, CONFIG_NAME)):
        return MegajoyView.open(path).check()
    if os.path.exists(os.path.join(path, "config.json")):
        return HfView(path).check()
    raise ValueError(f"{path}: neither a megajoy checkpoint ({CONFIG_NAME}) nor a Hugging Face directory "
                     f"(config.json)")
