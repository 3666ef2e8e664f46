"""Greedy decoding with the full forward pass (no cache): the reference continuation exports are
checked against."""

import torch


@torch.no_grad()
def greedy(model, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """The tokens greedy decoding appends to `prompt` (stopping after `eos_token_id` if given)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = list(prompt)
    try:
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids], device=device), compute_mtp=False).logits
            ids.append(int(logits[0, -1].argmax()))
            if ids[-1] == eos_token_id:
                break
    finally:
        model.train(was_training)
    return ids[len(prompt):]
