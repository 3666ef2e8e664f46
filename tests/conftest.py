import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton's interpreter runs the GPU kernels on CPU tensors (test_kernels.py); set before Triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic():
    from megajoy.kernels import backend

    torch.manual_seed(0)
    with backend.kernel_settings():  # a test (or a Trainer it runs) that changes them leaves no trace
        yield


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    """A byte-level BPE (DeepSeek-V3 special tokens at 0..2) trained on the synthetic documents."""
    from helpers import TEST_VOCAB, synthetic_documents
    from megajoy.data.tokenizer import train_bpe

    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_bpe(synthetic_documents(400, seed=1), TEST_VOCAB, path)
    return path


@pytest.fixture(scope="session")
def data_prefix(tmp_path_factory, tokenizer_file):
    """The synthetic corpus preprocessed by tools/preprocess_data.py into Megatron files."""
    from helpers import load_tool, synthetic_documents, write_jsonl

    directory = tmp_path_factory.mktemp("data")
    write_jsonl(directory / "docs.jsonl", synthetic_documents(600, seed=2))
    tool = load_tool("preprocess_data")
    assert tool.main(["--input", str(directory / "docs.jsonl"), "--output-prefix", str(directory / "docs"),
                      "--tokenizer", tokenizer_file]) == 0
    return str(directory / "docs_text_document")

