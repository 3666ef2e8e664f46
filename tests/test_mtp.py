"""The dense MTP module against Hugging Face transformers' own MtpModel on the same weights."""

import torch
import torch.nn.functional as F

from helpers import hf_reference, random_model, rel_err, small_config


def _hf_mtp_logits(hf, ids):
    """Depth-1 MTP logits from transformers: its MtpModel loads layer `num_hidden_layers` of our export."""
    from transformers.modeling_layers import MtpModel

    # transformers builds DeepSeek-V3's MTP layer as MoE (it forces first_k_dense_replace=0); JoyAI's MTP
    # layer is dense, so keep layer 0 of the MTP config dense. Everything else is transformers' own code.
    make_mtp_config = hf.config.get_mtp_config

    def dense_mtp_config():
        mtp_config = make_mtp_config()
        mtp_config.first_k_dense_replace = 1
        return mtp_config

    hf.config.get_mtp_config = dense_mtp_config
    mtp = MtpModel.from_pretrained(hf).eval()
    with torch.no_grad():
        h = hf.model(ids).last_hidden_state
        next_ids = torch.cat((ids[:, 1:], ids[:, :1]), dim=1)  # position i sees token i+1
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        out = mtp.forward_layer(0, h, positions, None, input_ids=next_ids)
        return mtp._project_to_logits(out)


def test_mtp_logits_and_loss_match_transformers(tmp_path):
    cfg = small_config(num_hidden_layers=2)
    model = random_model(cfg, seed=5)
    hf, _ = hf_reference(model, str(tmp_path / "hf"))
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    labels = torch.roll(ids, -1, 1)
    loss_mask = torch.ones(2, 20)
    loss_mask[:, -1] = 0  # the rolled-in label of the last position is not real
    ref_logits = _hf_mtp_logits(hf, ids)
    with torch.no_grad():
        out = model(ids, labels=labels, loss_mask=loss_mask, return_logits=True)
    # Positions whose next token is real (all but the last) must agree.
    assert rel_err(out.mtp_logits[0][:, :-1], ref_logits[:, :-1]) <= 1e-4
    # Independent loss: position i predicts t_{i+2}, which exists for i <= S-3.
    target = ids[:, 2:]
    ref_ce = F.cross_entropy(ref_logits[:, :-2].reshape(-1, cfg.vocab_size), target.reshape(-1), reduction="sum")
    assert out.mtp_tokens.item() == 2 * 18
    assert abs(out.mtp_loss_sum.item() - ref_ce.item()) <= 1e-4 * ref_ce.item()
    assert abs(out.mtp_loss.item() - ref_ce.item() / 36) <= 1e-5


def test_mtp_loss_weight_and_switch():
    cfg = small_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        on = model(ids, labels=torch.roll(ids, -1, 1))
        off = model(ids, labels=torch.roll(ids, -1, 1), compute_mtp=False)
    assert on.mtp_loss is not None and off.mtp_loss is None
    assert torch.equal(on.lm_loss, off.lm_loss)


def test_mtp_gradient_reaches_shared_embedding_and_head():
    cfg = small_config()
    model = random_model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    out = model(ids, labels=torch.roll(ids, -1, 1))
    out.mtp_loss.backward()
    assert model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.layers["0"].self_attn.o_proj.weight.grad.abs().sum() > 0  # through h


def test_packed_documents_give_each_depth_the_separate_documents_mtp_loss():
    """Two MTP depths on a packed row (EOD closing the first document, its position untrained as with
    eod_mask_loss) score what the two documents score alone: no depth reaches across the EOD into the
    next document (depth 2 at the token before EOD would read Emb(EOD), Emb(b_0) and predict b_1)."""
    from megajoy.data.packing import document_positions

    cfg = small_config(num_nextn_predict_layers=2)
    model = random_model(cfg, seed=2)
    g = torch.Generator().manual_seed(3)
    eod = 1
    stream = torch.randint(2, cfg.vocab_size, (1, 23), generator=g)
    stream[0, 8] = eod  # document A is stream[0..8], B the rest
    ids, labels = stream[:, :-1], stream[:, 1:]
    mask = (ids != eod).float()
    positions, documents = document_positions(ids, eod)
    with torch.no_grad():
        packed = model(ids, positions, documents, labels=labels, loss_mask=mask)
        alone = [model(ids[:, part], labels=labels[:, part], loss_mask=mask[:, part])
                 for part in (slice(0, 9), slice(9, 22))]
    assert packed.mtp_tokens.item() == sum(a.mtp_tokens.item() for a in alone) == ((7 + 12) + (6 + 11)) / 2
    assert abs(packed.mtp_loss_sum.item() - sum(a.mtp_loss_sum.item() for a in alone)) <= 1e-4
