"""clm and mlm on packed rows: which tokens are targets, the masking recipe's rates, and packed == unpacked."""

from types import SimpleNamespace

import pytest
import torch

from models import MODELS, create_model
from pretrain.loop import seed_step
from pretrain.objectives.clm import CLM, IGNORE, CLMConfig, next_token_targets
from pretrain.objectives.mlm import MLM, MLMConfig, mask_tokens

TOK = SimpleNamespace(
    vocab_size=512, pad_id=0, bos_id=1, eos_id=2, unk_id=3, mask_id=4, special_ids=[0, 1, 2, 3, 4]
)


def small(name, **kw):
    return create_model(name, **{**MODELS.get(name).smoke, "vocab_size": TOK.vocab_size, **kw})


def packed_row():
    """One row: doc 0 = [BOS a b c EOS], doc 1 = [BOS d e EOS], then 3 padding tokens."""
    ids = torch.tensor([[1, 10, 11, 12, 2, 1, 13, 14, 2, 0, 0, 0]])
    doc = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]])
    return ids, doc, pos


def test_clm_targets_stay_inside_each_document():
    ids, doc, _ = packed_row()
    t = next_token_targets(ids, doc, bos_id=1)
    assert t.tolist() == [[10, 11, 12, 2, IGNORE, 13, 14, 2, IGNORE, IGNORE, IGNORE, IGNORE]]
    # the last token of document 0 (EOS) never predicts document 1's BOS; BOS and padding are never targets
    assert not (t == 1).any() and not (t == 0).any()


def test_clm_bos_inside_a_document_is_never_a_target():
    ids = torch.tensor([[5, 1, 6, 7]])
    doc = torch.zeros_like(ids)
    assert next_token_targets(ids, doc, bos_id=1).tolist() == [[IGNORE, 6, 7, IGNORE]]


def test_mlm_rates_on_1e5_tokens():
    """Chosen ≈ mask_prob of eligible tokens; of those 80/10/10 within ±1%; special tokens and padding never."""
    g = torch.Generator().manual_seed(0)
    n = 100_000
    ids = torch.randint(5, 512, (1, n), generator=g)
    specials = torch.rand(1, n, generator=g) < 0.1
    ids[specials] = 2  # EOS sprinkled in
    doc = torch.zeros_like(ids)
    doc[:, -1000:] = -1  # padding at the end
    ids[:, -1000:] = 0
    eligible = (doc >= 0) & ~torch.isin(ids, torch.tensor(TOK.special_ids))
    cfg = MLMConfig(mask_prob=0.15)
    regular = torch.arange(5, 512)
    inputs, targets = mask_tokens(ids, eligible, cfg, TOK.mask_id, regular, generator=g)
    chosen = targets != IGNORE
    assert not chosen[~eligible].any()  # specials and padding never chosen
    assert (inputs[~eligible] == ids[~eligible]).all()  # ...nor changed
    assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.01
    masked = (inputs == TOK.mask_id) & chosen
    same = (inputs == ids) & chosen
    randomized = chosen & ~masked & ~same
    k = chosen.sum()
    assert abs(masked.sum() / k - 0.8) < 0.01
    # a random replacement may draw the original id (1 in 507): "same" holds the 10% kept plus those
    assert abs(same.sum() / k - 0.1) < 0.01 and abs(randomized.sum() / k - 0.1) < 0.01
    assert (inputs[randomized] >= 5).all()  # random replacements are regular tokens
    assert (targets[chosen] == ids[chosen]).all()


def test_mlm_draws_depend_only_on_seed_step_rank():
    torch.manual_seed(0)
    model = MLM(small("modernbert_test"), MLMConfig(), tokenizer=TOK)
    ids = torch.randint(5, 512, (2, 64))
    batch = {"input_ids": ids, "doc_ids": torch.zeros_like(ids), "positions": None}

    def run(step, rank):
        seed_step(0, step, rank)
        return model(batch)["loss"].item()

    assert run(3, 0) == run(3, 0)
    assert run(3, 0) != run(4, 0) and run(3, 0) != run(3, 1)


def test_objectives_refuse_the_wrong_kind_of_model():
    with pytest.raises(ValueError, match="causal text model"):
        CLM(small("modernbert_test"), CLMConfig(), tokenizer=TOK)
    with pytest.raises(ValueError, match="bidirectional text model"):
        MLM(small("llama_test"), MLMConfig(), tokenizer=TOK)
    with pytest.raises(ValueError, match="mask token"):
        MLM(
            small("modernbert_test"), MLMConfig(), tokenizer=SimpleNamespace(**{**vars(TOK), "mask_id": None})
        )


def test_clm_packed_loss_and_grads_equal_the_documents_run_alone():
    """Sum of per-token losses over a packed row == the sum over each document run unpacked; gradients too."""
    torch.manual_seed(0)
    model = CLM(small("llama_test"), CLMConfig(), tokenizer=TOK).double()
    lengths = [1, 7, 33, 50]
    docs = [torch.randint(5, 512, (n,)) for n in lengths]
    ids = torch.cat(docs)[None]
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    out = model({"input_ids": ids, "doc_ids": doc, "positions": pos})
    (out["loss"] * out["tokens"]).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0.0
    for d in docs:
        o = model(
            {"input_ids": d[None], "doc_ids": torch.zeros(1, len(d), dtype=torch.long), "positions": None}
        )
        (o["loss"] * o["tokens"]).backward()
        total += (o["loss"] * o["tokens"]).item()
    assert out["tokens"].item() == sum(n - 1 for n in lengths)
    assert abs(out["loss"].item() * out["tokens"].item() - total) < 1e-9 * abs(total)
    for n, p in model.named_parameters():
        ref = p.grad
        assert (packed[n] - ref).norm() <= 1e-9 * ref.norm() + 1e-15, n
