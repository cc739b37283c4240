"""The text backbone contract (models/text_layers.py), checked over every registered model with modality "text"
at its smoke size: shapes, gradients, bf16, activation checkpointing, hparams, init, documents of a packed row."""

import inspect

import pytest
import torch
import yaml

from models import MODELS, create_model, list_models
from pretrain.optim import layer_ids

NAMES = [n for n in list_models() if getattr(MODELS.get(n).builds, "modality", None) == "text"]
# the CI-sized members run by default; the paper sizes (up to ~100M parameters even at smoke size: widths stay)
# run their numerics with the slow tests, and their structure by default on the meta device
SIZED = [n if "_test" in n else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]
B, N = 2, 24


def small(name, **kw):
    return create_model(name, **{**MODELS.get(name).smoke, **kw})


def ids_for(model, batch=B, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.hparams()["vocab_size"], (batch, n), generator=g)


def packed(n=N):
    """One row of three documents (lengths 5, 12, n - 17) with restarting positions, and a one-document row."""
    lengths = [5, 12, n - 17]
    docs = torch.cat([torch.full((L,), d) for d, L in enumerate(lengths)])
    pos = torch.cat([torch.arange(L) for L in lengths])
    doc_ids = torch.stack([docs, torch.zeros(n, dtype=torch.long)])  # (2, N)
    positions = torch.stack([pos, torch.arange(n)])  # (2, N)
    return positions, doc_ids, lengths


def test_there_are_text_models_and_every_family_has_a_test_member():
    assert any(n.startswith("llama_") for n in NAMES)
    for name in NAMES:
        f = MODELS.get(name)
        assert inspect.isclass(f.builds) and isinstance(f.smoke, dict), name
    for cls in {MODELS.get(n).builds for n in NAMES}:
        assert any(MODELS.get(n).builds is cls and "_test" in n for n in NAMES), cls.__name__


@pytest.mark.parametrize("name", SIZED)
def test_forward_shapes_and_every_param_gets_grad(name):
    torch.manual_seed(0)
    model = small(name).train()
    ids = ids_for(model)
    positions, doc_ids, _ = packed()
    feats = model.forward_features(ids, positions=positions, doc_ids=doc_ids)
    assert feats.shape == (B, N, model.num_features)
    logits = model.forward_head(feats)
    assert logits.shape == (B, N, model.hparams()["vocab_size"])
    torch.testing.assert_close(model(ids, positions, doc_ids), logits)
    assert model(ids).shape == logits.shape  # positions and doc_ids are optional
    target = torch.randint(0, logits.shape[-1], (B, N), generator=torch.Generator().manual_seed(1))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", SIZED)
def test_bf16_forward_close_to_fp32(name):
    """Features and logits within bf16 rounding of fp32 (the bar of tests/test_models.py)."""
    torch.manual_seed(0)
    model = small(name).eval()
    ids = ids_for(model)

    def outputs(m):
        feats = m.forward_features(ids)
        return [feats, m.forward_head(feats)]

    with torch.no_grad():
        ref = outputs(model)
        out = outputs(model.to(torch.bfloat16))
    for i, (a, b) in enumerate(zip(out, ref)):
        assert a.dtype == torch.bfloat16, i
        a = a.float()
        assert torch.isfinite(a).all(), i
        assert b.abs().mean() > 0, i
        assert (a - b).abs().mean() < 0.05 * b.abs().mean() + 1e-3, i
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.99, (i, cos)


def _saved_tensor_count(fn) -> tuple[int, torch.Tensor]:
    """How many tensors autograd saves for backward while `fn` runs (checkpointed blocks save only inputs)."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return count, out


@pytest.mark.parametrize("name", SIZED)
def test_grad_checkpointing_changes_memory_not_math(name):
    positions, doc_ids, _ = packed()
    runs = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = small(name).train()
        model.set_grad_checkpointing(ckpt)
        ids = ids_for(model)
        saved, out = _saved_tensor_count(lambda: model(ids, positions, doc_ids))  # noqa: B023
        out.square().mean().backward()
        runs.append((saved, out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (saved0, out0, g0), (saved1, out1, g1) = runs
    assert saved1 < saved0, (saved1, saved0)  # the checkpointed path really runs
    torch.testing.assert_close(out1, out0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], msg=lambda m, n=n: f"grad {n}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_hparams_rebuild_and_grouping(name):
    """hparams() rebuilds the same architecture (plain types, for checkpoints' YAML); no_weight_decay() names
    parameters; group_matcher() puts each in one depth group. On the meta device: every size, no cost."""
    with torch.device("meta"):
        model = small(name)
        rebuilt = type(model)(**model.hparams())
    yaml.safe_dump(model.hparams())
    assert rebuilt.hparams() == model.hparams()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    params = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(params), model.no_weight_decay() - set(params)
    ids_ = layer_ids(model)  # every parameter in exactly one depth group, embeddings first, one per block
    assert set(ids_) == set(params)
    assert min(ids_.values()) == 0 and max(ids_.values()) == model.hparams()["depth"] + 1


@pytest.mark.parametrize("name", SIZED)
def test_hparams_rebuild_computes_the_same(name):
    torch.manual_seed(0)
    model = small(name).eval()
    rebuilt = type(model)(**model.hparams()).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    ids = ids_for(model)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids), model(ids), atol=0, rtol=0)


@pytest.mark.parametrize("name", SIZED)
def test_init_is_deterministic(name):
    states = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        states.append(small(name).state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], atol=0, rtol=0, msg=k)
    assert any(not torch.equal(states[2][k], states[0][k]) for k in states[0])


@pytest.mark.parametrize("name", SIZED)
def test_documents_are_isolated_and_rows_are_bounded(name):
    """Changing one document of a packed row changes no other document's features; a row over max_seq_len is
    an error naming it."""
    torch.manual_seed(0)
    model = small(name).eval()
    ids = ids_for(model)
    positions, doc_ids, lengths = packed()
    changed = ids.clone()
    changed[0, 5:17] = (changed[0, 5:17] + 1) % model.hparams()["vocab_size"]  # document 1 of row 0
    with torch.no_grad():
        a = model.forward_features(ids, positions, doc_ids)
        b = model.forward_features(changed, positions, doc_ids)
    assert (a[0, 5:17] - b[0, 5:17]).abs().max() > 1e-3  # the probe can see a change
    torch.testing.assert_close(b[0, :5], a[0, :5], atol=1e-6, rtol=0)
    torch.testing.assert_close(b[0, 17:], a[0, 17:], atol=1e-6, rtol=0)
    torch.testing.assert_close(b[1], a[1], atol=1e-6, rtol=0)
    limit = 16
    short = small(name, max_seq_len=limit)
    with pytest.raises(ValueError, match="max_seq_len"):
        short(ids_for(short, batch=1, n=limit + 1))
