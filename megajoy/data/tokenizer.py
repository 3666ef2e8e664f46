"""Tokenizers: any Hugging Face `tokenizer.json`, loaded with the `tokenizers` library, and the built-in
byte-level BPE trained on the built-in corpus.

Special tokens follow DeepSeek-V3: id 0 begins a sequence, id 1 ends one (it is also the end-of-document
token, EOD, that separates packed documents), id 2 pads.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]


def tokenizer_file(path: str) -> str:
    """The tokenizer.json that `path` names: the file itself, or the one in a model directory."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    return path


def load_tokenizer(path: str) -> Tokenizer:
    path = tokenizer_file(path)
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None


@dataclass(frozen=True)
class TokenizerInfo:
    """What training needs to know about a tokenizer file, in a form that pickles and hashes."""

    path: str
    vocab_size: int
    eod: int
    bos: int | None
    sha256: str

    @classmethod
    def from_file(cls, path: str, eod_token: str | None = None) -> "TokenizerInfo":
        path = tokenizer_file(path)
        tok = load_tokenizer(path)
        eod = _find_token(tok, [eod_token] if eod_token else [EOS_TOKEN, "</s>", "<|endoftext|>", "<eos>"])
        if eod is None:
            raise ValueError(f"{path}: no end-of-document token found (looked for {EOS_TOKEN!r}, '</s>', "
                             f"'<|endoftext|>', '<eos>'); name it with --eod-token")
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        bos = _find_token(tok, [BOS_TOKEN, "<s>", "<bos>", "<|begin_of_text|>"])
        return cls(path, tok.get_vocab_size(), eod, bos, digest)

    @property
    def unique_identifiers(self) -> dict:
        """Read by megatron-core when it hashes a dataset's cache key."""
        return {"class": "megajoy.TokenizerInfo", "sha256": self.sha256, "eod": self.eod}


class MegatronTokenizerShim:
    """The attributes megatron-core's GPTDataset reads from its tokenizer (it never tokenizes)."""

    def __init__(self, info: TokenizerInfo):
        self.vocab_size = info.vocab_size
        self.eod = info.eod
        self.unique_identifiers = info.unique_identifiers


def _find_token(tok: Tokenizer, candidates: list[str]) -> int | None:
    for token in candidates:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def train_bpe(texts: Iterable[str], vocab_size: int, path: str) -> None:
    """A byte-level BPE (GPT-2 style pre-tokenisation) with DeepSeek-V3's special tokens at ids 0..2 and
    the chat template's after them, so post-training needs no new embeddings."""
    from megajoy.data.chat import TEMPLATE_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + TEMPLATE_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)


TOKENIZER_CONFIG = "tokenizer_config.json"


def tokenizer_config_beside(tokenizer_file: str) -> str | None:
    """The Hugging Face tokenizer_config.json next to `tokenizer_file` (its chat template, special tokens),
    if there is one."""
    path = os.path.join(os.path.dirname(os.path.abspath(tokenizer_file)), TOKENIZER_CONFIG)
    return path if os.path.isfile(path) else None


def copy_tokenizer(tokenizer_file: str, directory: str) -> None:
    """tokenizer.json into `directory`, with the tokenizer_config.json beside it when there is one: the chat
    template a Hugging Face model came with goes wherever its tokenizer goes."""
    shutil.copyfile(tokenizer_file, os.path.join(directory, "tokenizer.json"))
    config = tokenizer_config_beside(tokenizer_file)
    if config:
        shutil.copyfile(config, os.path.join(directory, TOKENIZER_CONFIG))


def write_hf_tokenizer_files(tokenizer_file: str, directory: str, cfg) -> None:
    """tokenizer.json plus a tokenizer_config.json that lets `AutoTokenizer` load it: the one that came
    with the tokenizer, else a minimal one (with megajoy's chat template when the tokenizer has its tokens)."""
    from megajoy.data.chat import megajoy_chat_template  # chat builds on this module

    copy_tokenizer(tokenizer_file, directory)
    if tokenizer_config_beside(tokenizer_file):
        return
    tok = load_tokenizer(tokenizer_file)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.id_to_token(cfg.bos_token_id),
        "eos_token": tok.id_to_token(cfg.eos_token_id),
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    pad = tok.token_to_id(PAD_TOKEN)
    if pad is not None:
        config["pad_token"] = PAD_TOKEN
    template = megajoy_chat_template(tok)
    if template:
        config["chat_template"] = template
    with open(os.path.join(directory, TOKENIZER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
