"""Damaged checkpoints are refused with one ValueError naming the file, the tensor and what was expected:
corrupt safetensors headers, integer tensors where floating weights belong, and broken INT4 experts.
Each case corrupts a real tiny checkpoint written by megajoy's own exporters."""

import json
import re
import shutil
import struct

import pytest
import torch
from helpers import random_model, small_config
from megajoy.ckpt.convert import convert
from megajoy.ckpt.hf import save_hf_dir
from megajoy.ckpt.native import load_model_dir, model_state, save_model_dir
from megajoy.ckpt.view import state_view

O_PROJ = "model.layers.1.self_attn.o_proj.weight"  # [64, 64] F32: 16384 bytes
EXPERT = "model.layers.1.mlp.experts.2.up_proj."  # [32, 64]: int4 packed [32, 8], scales [32, 2] (group 32)


@pytest.fixture(scope="module")
def model():
    return random_model(small_config(), seed=9)


@pytest.fixture(scope="module")
def clean_dirs(model, tmp_path_factory):
    """A Hugging Face directory (fp32), its INT4 twin (experts packed, groups of 32) and a megajoy one."""
    root = tmp_path_factory.mktemp("clean")
    view = state_view(model.cfg, model_state(model))
    save_hf_dir(str(root / "hf"), view, dtype=torch.float32)
    save_hf_dir(str(root / "int4"), view, dtype=torch.float32, int4_group=32)
    save_model_dir(str(root / "megajoy"), view)
    return root


def copy_of(clean_dirs, kind, tmp_path):
    shutil.copytree(clean_dirs / kind, tmp_path / kind)
    return tmp_path / kind


def read_raw(path):
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), f.read()


def write_raw(path, header, data):
    """A safetensors file by hand: 8-byte little-endian header length, JSON header, data."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(path, edit):
    header, data = read_raw(path)
    write_raw(path, edit(header, len(data)), data)


def edit_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def refused(directory, tmp_path, message):
    """Converting `directory` raises exactly `message` (a literal prefix) and writes nothing."""
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        convert(str(directory), str(tmp_path / "out"), "megajoy")
    assert not (tmp_path / "out").exists()


def entry_edit(field, value):
    def edit(header, data_size):
        header[O_PROJ][field] = value(header[O_PROJ][field], data_size) if callable(value) else value
        return header
    return edit


# ------------------------------------------------------------------------------------------ headers

HEADER_CASES = {
    "offsets_short": (entry_edit("data_offsets", lambda o, _: [o[0], o[1] - 16]),
                      "data_offsets [{b}, {e_short}] span 16368 bytes, expected 16384 (shape [64, 64] of F32)"),
    "offsets_long": (entry_edit("data_offsets", lambda o, _: [o[0], o[1] + 16]),
                     "data_offsets [{b}, {e_long}] span 16400 bytes, expected 16384 (shape [64, 64] of F32)"),
    "offsets_reversed": (entry_edit("data_offsets", lambda o, _: [o[1], o[0]]),
                         "data_offsets [{e}, {b}], expected [begin, end] with 0 <= begin <= end"),
    "offsets_past_the_data": (entry_edit("data_offsets", lambda o, size: [size - 16384 + 64, size + 64]),
                              "ends at byte {size_plus} of the data section, which holds {size}"),
    "no_data_offsets": (lambda h, _: {**h, O_PROJ: {"dtype": "F32", "shape": [64, 64]}},
                        "header entry {{'dtype': 'F32', 'shape': [64, 64]}} lacks data_offsets"),
    "unknown_dtype": (entry_edit("dtype", "F12"), "dtype 'F12', expected one of F64, F32"),
    "negative_shape": (entry_edit("shape", [-64, -64]),
                       "shape [-64, -64], expected a list of non-negative integers"),
    "fractional_shape": (entry_edit("shape", [64.0, 64]),
                         "shape [64.0, 64], expected a list of non-negative integers"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_corrupt_header_entries_name_file_and_tensor(case, clean_dirs, tmp_path):
    directory = copy_of(clean_dirs, "hf", tmp_path)
    path = directory / "model.safetensors"
    header, data = read_raw(path)
    b, e = header[O_PROJ]["data_offsets"]
    edit, detail = HEADER_CASES[case]
    edit_header(path, edit)
    detail = detail.format(b=b, e=e, e_short=e - 16, e_long=e + 16, size=len(data), size_plus=len(data) + 64)
    if case == "offsets_past_the_data":
        refused(directory, tmp_path, f"{path}: truncated safetensors file: tensor {O_PROJ!r} {detail}")
    else:
        refused(directory, tmp_path, f"{path}: tensor {O_PROJ!r}: {detail}")


def test_header_that_is_not_an_object(clean_dirs, tmp_path):
    directory = copy_of(clean_dirs, "hf", tmp_path)
    edit_header(directory / "model.safetensors", lambda header, _: [1, 2, 3])
    refused(directory, tmp_path, f"{directory / 'model.safetensors'}: header is a JSON list, expected an object")


def test_index_whose_weight_map_is_not_an_object(clean_dirs, tmp_path):
    directory = copy_of(clean_dirs, "hf", tmp_path)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    refused(directory, tmp_path, f"{directory / 'model.safetensors.index.json'}: weight_map ['model.safetensors'], "
                                 f"expected an object mapping tensor names to file names")


# ------------------------------------------------------------------------------------------ dtypes

FLOAT_EXPECTED = "has dtype I32, expected a floating-point dtype (F64, F32, F16, BF16, F8_E4M3, F8_E5M2)"


@pytest.mark.parametrize("name", [O_PROJ, EXPERT + "weight"])
def test_integer_weight_in_a_hugging_face_directory(name, clean_dirs, tmp_path):
    directory = copy_of(clean_dirs, "hf", tmp_path)
    path = directory / "model.safetensors"
    edit_header(path, lambda header, _: {**header, name: {**header[name], "dtype": "I32"}})  # same byte size
    refused(directory, tmp_path, f"{path}: tensor {name!r} {FLOAT_EXPECTED}")


def test_integer_weight_in_a_megajoy_directory(clean_dirs, tmp_path):
    directory = copy_of(clean_dirs, "megajoy", tmp_path)
    name = "layers.1.self_attn.o_proj.weight"
    edit_header(directory / "model.safetensors", lambda header, _: {**header, name: {**header[name], "dtype": "I32"}})
    refused(directory, tmp_path, f"{directory}: tensor {name!r} {FLOAT_EXPECTED}")


# ------------------------------------------------------------------------------------------ INT4 experts

def _drop_scale(tensors):
    del tensors[EXPERT + "weight_scale"]


def _set(part, make):
    return lambda tensors: tensors.__setitem__(EXPERT + part, make(tensors[EXPERT + part]).contiguous())


INT4_CASES = {
    "missing_scale": (_drop_scale, "{directory}: tensor '{p}weight_scale' missing (an int4 expert has "
                                   "weight_shape, weight_packed, weight_scale)"),
    "packed_misshaped": (_set("weight_packed", lambda t: t[:, :4]),
                         "{file}: tensor '{p}weight_packed' has shape (32, 4), expected (32, 8)"),
    "packed_as_float": (_set("weight_packed", lambda t: t.float()),
                        "{file}: tensor '{p}weight_packed' has dtype F32, expected I32"),
    "scale_misshaped": (_set("weight_scale", lambda t: t[:-1]),
                        "{file}: tensor '{p}weight_scale' has shape (31, 2), expected (32, 2)"),
    "scale_as_integer": (_set("weight_scale", lambda t: t.int()),
                         "{file}: tensor '{p}weight_scale' has dtype I32, expected a floating-point dtype"),
    "weight_shape_wrong": (_set("weight_shape", lambda t: torch.tensor([32, 32])),
                           "{file}: tensor '{p}weight_shape' holds (32, 32), the config expects (32, 64)"),
}


@pytest.mark.parametrize("case", sorted(INT4_CASES))
def test_damaged_int4_experts_are_named(case, clean_dirs, tmp_path):
    directory = copy_of(clean_dirs, "int4", tmp_path)
    edit, message = INT4_CASES[case]
    edit_tensors(directory / "model.safetensors", edit)
    refused(directory, tmp_path, message.format(directory=directory, file=directory / "model.safetensors", p=EXPERT))


def _edit_weights_config(directory, **fields):
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(fields)
    (directory / "config.json").write_text(json.dumps(config))


INT4_CONFIG_CASES = {  # compressed-tensors configs megajoy cannot read; before, shape errors or silent garbage
    "8_bit": (dict(num_bits=8), "{directory}/config.json: quantization_config.config_groups.group_0.weights.num_bits=8 is "
                                "not supported"),
    "asymmetric": (dict(symmetric=False), "{directory}/config.json: quantization_config.config_groups."
                                          "group_0.weights.symmetric=False is not supported"),
    "channelwise": (dict(strategy="channel", group_size=None), "{directory}/config.json: quantization_"
                                                               "config.config_groups.group_0.weights.strategy='channel' is not supported"),
    "other_group": (dict(group_size=64), "{file}: tensor 'model.layers.1.mlp.experts.0.gate_proj.weight_scale' has "
                                         "shape (32, 2), expected (32, 1)"),
}


@pytest.mark.parametrize("case", sorted(INT4_CONFIG_CASES))
def test_int4_configs_megajoy_does_not_read_are_named(case, clean_dirs, tmp_path):
    directory = copy_of(clean_dirs, "int4", tmp_path)
    fields, message = INT4_CONFIG_CASES[case]
    _edit_weights_config(directory, **fields)
    refused(directory, tmp_path, message.format(directory=directory, file=directory / "model.safetensors"))


def test_int4_groups_of_any_size_read_as_compressed_tensors_decompresses_them(clean_dirs, tmp_path):
    """Experts packed in groups of 16 (no training grid of megajoy's): imported, each equals compressed-tensors'
    own decompression. Before, "int4 group size 16 must be 32 or 64"."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    from megajoy.quant.formats import WeightFormat
    from megajoy.quant.pack import pack_int4

    directory = copy_of(clean_dirs, "int4", tmp_path)
    fmt16, fmt32 = WeightFormat("int4", 16), WeightFormat("int4", 32)

    def regroup(tensors):
        for prefix in [k[:-len("weight_packed")] for k in tensors if k.endswith("weight_packed")]:
            codes, scales = fmt16.quantize(fmt32.dequantize(*_unpacked(tensors, prefix)))
            tensors[prefix + "weight_packed"], tensors[prefix + "weight_scale"] = pack_int4(codes), scales

    edit_tensors(directory / "model.safetensors", regroup)
    _edit_weights_config(directory, group_size=16)
    convert(str(directory), str(tmp_path / "out"), "megajoy")
    _, state, _ = load_model_dir(str(tmp_path / "out"))
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    files = load_file(str(directory / "model.safetensors"))
    parts = {k.rsplit(".", 1)[1]: v for k, v in files.items() if k.startswith(EXPERT)}
    reference = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
    gate_up = state["layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(gate_up[2, gate_up.shape[1] // 2:], reference.float())


def _unpacked(tensors, prefix):
    from megajoy.quant.pack import unpack_int4

    return unpack_int4(tensors[prefix + "weight_packed"]), tensors[prefix + "weight_scale"]


# ------------------------------------------------------------------------------------------ clean input

@pytest.mark.parametrize("kind", ["hf", "int4"])
def test_hand_written_copy_of_a_good_file_still_converts(kind, model, clean_dirs, tmp_path):
    directory = copy_of(clean_dirs, kind, tmp_path)
    edit_header(directory / "model.safetensors", lambda header, _: header)
    convert(str(directory), str(tmp_path / "out"), "megajoy")
    _, state, _ = load_model_dir(str(tmp_path / "out"))
    for name, want in model_state(model).items():
        if kind == "hf" or ".mlp.experts." not in name:
            assert torch.equal(state[name], want), name
