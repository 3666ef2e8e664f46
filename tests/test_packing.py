"""Packed rows: per-document positions and a block-diagonal causal mask make each document independent."""

import torch

from helpers import random_model, rel_err, small_config
from megajoy.kernels.attention import document_causal_mask


def test_document_mask_is_block_diagonal_causal():
    mask = document_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [0, 0, 1, 0, 0],
                             [0, 0, 1, 1, 0],
                             [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_packed_documents_equal_separate_runs():
    cfg = small_config()
    model = random_model(cfg)
    a = torch.randint(0, cfg.vocab_size, (1, 11))
    b = torch.randint(0, cfg.vocab_size, (1, 17))
    packed = torch.cat((a, b), dim=1)
    positions = torch.cat((torch.arange(11), torch.arange(17))).unsqueeze(0)
    documents = torch.tensor([[0] * 11 + [1] * 17])
    with torch.no_grad():
        both = model(packed, position_ids=positions, document_ids=documents).logits
        alone_a, alone_b = model(a).logits, model(b).logits
        unmasked = model(packed).logits
    assert rel_err(both[:, :11], alone_a) <= 1e-5
    assert rel_err(both[:, 11:], alone_b) <= 1e-5
    # Without the document mask the second document sees the first: the test can tell the difference.
    assert rel_err(unmasked[:, 11:], alone_b) > 1e-2


def test_packed_losses_equal_separate_losses():
    cfg = small_config()
    model = random_model(cfg)
    a, b = torch.randint(0, cfg.vocab_size, (1, 9)), torch.randint(0, cfg.vocab_size, (1, 13))
    la, lb = torch.roll(a, -1, 1), torch.roll(b, -1, 1)
    positions = torch.cat((torch.arange(9), torch.arange(13))).unsqueeze(0)
    documents = torch.tensor([[0] * 9 + [1] * 13])
    with torch.no_grad():
        packed = model(torch.cat((a, b), 1), position_ids=positions, document_ids=documents,
                       labels=torch.cat((la, lb), 1), compute_mtp=False)
        sa = model(a, labels=la, compute_mtp=False)
        sb = model(b, labels=lb, compute_mtp=False)
    assert packed.lm_tokens.item() == 22
    assert abs(packed.lm_loss_sum.item() - (sa.lm_loss_sum + sb.lm_loss_sum).item()) <= 1e-4
