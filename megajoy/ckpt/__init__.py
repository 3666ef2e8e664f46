"""Checkpoints: megajoy's own files, Hugging Face and GGUF layouts."""
