"""Shared test helpers: small random DeepSeek-V3-shaped configs and the Hugging Face reference model."""

import dataclasses

import torch

from megajoy.ckpt.hf import save_hf_dir
from megajoy.ckpt.native import model_state
from megajoy.ckpt.view import state_view
from megajoy.config import ModelConfig
from megajoy.model import create_model


def small_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        max_position_embeddings=256, rope_theta=1e4,
    )
    base.update(overrides)
    return ModelConfig(**base)


def random_model(cfg: ModelConfig, seed: int = 0, bias_std: float = 0.05):
    """A model with random weights and a random (nonzero) router bias, in eval mode."""
    model = create_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * bias_std)
    return model.eval()


def hf_reference(model, directory: str):
    """Export `model` to a Hugging Face directory (fp32) and load it back with transformers."""
    from transformers import AutoModelForCausalLM

    save_hf_dir(directory, state_view(model.cfg, model_state(model)), dtype=torch.float32)
    hf, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    # transformers hard-codes DeepSeek-V3's MTP layer index (61) as the unexpected-key pattern; point it
    # at this config's MTP layer so its MtpModel can find the weights.
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{model.cfg.num_hidden_layers}\..*"]
    return hf.eval(), info


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def replace(cfg: ModelConfig, **kw) -> ModelConfig:
    return dataclasses.replace(cfg, **kw)


WORDS = ("the a one some every cat dog bird fish model token layer expert router sat ran flew swam "
         "reads writes routes trains on under over near with quickly slowly").split()


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences: enough structure for a tiny model to learn something."""
    import random

    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(WORDS[:5]), rng.choice(WORDS[5:13]), rng.choice(WORDS[13:20]),
                     rng.choice(WORDS[20:24]), rng.choice(WORDS[:5]), rng.choice(WORDS[5:13])]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def byte_level_bpe(texts, special_tokens: list[str], path, vocab_size: int = 280) -> str:
    """A byte-level BPE trained on `texts` whose specials are `special_tokens` (ids 0, 1, ...), saved at `path`:
    another family's tokenizer than megajoy's DeepSeek-named one (megajoy.data.tokenizer.train_bpe)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path))
    return str(path)


def write_jsonl(path, docs, key: str = "text") -> None:
    import json

    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({key: doc}) + "\n")


def say_seven_data(directory, n: int = 64) -> tuple[str, str]:
    """(chat JSONL, RL prompts JSONL) of n prompts "Say seven, i." answered "7": a task the tiny test model
    learns in 30 SFT steps, so that exact match and RL rewards are neither all 0 nor all 1 along the way."""
    import json
    import os

    asks = [f"Say seven, {i}." for i in range(n)]
    chat, prompts = os.path.join(directory, "seven_chat.jsonl"), os.path.join(directory, "seven_prompts.jsonl")
    with open(chat, "w") as f:
        f.writelines(json.dumps({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": "7"}],
                                 "answer": "7"}) + "\n" for ask in asks)
    with open(prompts, "w") as f:
        f.writelines(json.dumps({"prompt": ask, "answer": "7"}) + "\n" for ask in asks)
    return chat, prompts


# A model small enough for many short training runs in the test suite (vocab fits TEST_VOCAB).
TEST_VOCAB = 320
TINY_MODEL_OVERRIDES = [
    "model.vocab_size=320", "model.hidden_size=32", "model.intermediate_size=64", "model.moe_intermediate_size=16",
    "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.q_lora_rank=16", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.n_routed_experts=4",
    "model.num_experts_per_tok=2",
]


def init_tiny_checkpoint(out, tokenizer_file: str | None = None, *overrides: str) -> None:
    """`megajoy init` of the tiny test model (plus `overrides`) into `out`, storing the tokenizer if given."""
    from megajoy.cli import main

    sets = [a for o in TINY_MODEL_OVERRIDES + list(overrides) for a in ("--set", o)]
    tokenizer = ["--tokenizer", tokenizer_file] if tokenizer_file else []
    assert main(["init", "--out", str(out)] + tokenizer + sets) == 0


def load_tool(name: str):
    """Import tools/NAME.py as a module (the tools are scripts, not package modules)."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
