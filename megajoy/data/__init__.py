"""Data: Megatron indexed datasets, packing, tokenizers, chat / preference / RL formats."""

import warnings

# megatron-core warns at import that Transformer Engine and Apex are absent; megajoy uses only its
# dataset code, which needs neither.
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")
