"""Tokenizers: any Hugging Face `tokenizer.json`, loaded with the `tokenizers` library."""

import json
import os
import shutil

from tokenizers import Tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None


def write_hf_tokenizer_files(tokenizer_file: str, directory: str, cfg) -> None:
    """tokenizer.json plus the tokenizer_config.json that lets `AutoTokenizer` load it."""
    tok = load_tokenizer(tokenizer_file)
    shutil.copyfile(tokenizer_file, os.path.join(directory, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.id_to_token(cfg.bos_token_id),
        "eos_token": tok.id_to_token(cfg.eos_token_id),
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
