"""ToMe token merging and EViT token pruning on ViT (models/token_reduce.py): each step against a by-hand
definition, the off switches bit-identical to the plain model, and the refusals naming the switch."""

import math

import pytest
import torch
import torch.nn.functional as F

from models import create_model
from models.token_reduce import _attend, bipartite_merge, evit_select, reduced_block
from models.vit_hf import check_vit_exportable


def vit(**kw):
    torch.manual_seed(0)
    return create_model("vit_test_patch4", **kw).eval()


def test_off_switches_are_bit_identical_to_the_plain_model():
    plain, x = vit(), torch.randn(2, 3, 32, 32)
    off = vit(tome_r=0, evit_keep_rate=1.0)
    assert torch.equal(off(x), plain(x))
    # the reduced path itself, with nothing to reduce, is the plain block bit for bit
    tokens = plain.embed(x)
    size = torch.ones(2, tokens.shape[1], 1)
    for blk in plain.blocks:
        out, s = reduced_block(blk, tokens, size, prefix=1, r=0, keep_rate=1.0)
        assert torch.equal(out, blk(tokens)) and torch.equal(s, size)


def reference_merge(x, size, metric, r):
    """ToMe's bipartite soft matching for one sample, by hand: A = even positions, B = odd, each A token's
    best B by cosine similarity, the r best-matched A tokens averaged (size-weighted) into their B token."""
    n = x.shape[0]
    a, b = list(range(0, n, 2)), list(range(1, n, 2))
    sim = {i: max((F.cosine_similarity(metric[i], metric[j], dim=0).item(), j) for j in b) for i in a}
    merged_away = sorted(a, key=lambda i: -sim[i][0])[:r]
    groups = {j: [j] for j in b}
    for i in merged_away:
        groups[sim[i][1]].append(i)
    out, sizes = [], []
    for i in [i for i in a if i not in merged_away]:
        out.append(x[i])
        sizes.append(size[i])
    for j in b:
        s = sum(size[k] for k in groups[j])
        out.append(sum(x[k] * size[k] for k in groups[j]) / s)
        sizes.append(s)
    return torch.stack(out), torch.stack(sizes)


@pytest.mark.parametrize("n, r", [(16, 4), (15, 7), (9, 100)])
def test_bipartite_merge_is_tomes_matching(n, r):
    g = torch.Generator().manual_seed(n)
    x, metric = torch.randn(3, n, 8, generator=g), torch.randn(3, n, 5, generator=g)
    size = torch.randint(1, 4, (3, n, 1), generator=g).double()
    out, sizes = bipartite_merge(x.double(), size, metric.double(), r)
    assert out.shape[1] == n - min(r, n // 2)
    for i in range(3):
        want, want_sizes = reference_merge(x[i].double(), size[i], metric[i].double(), min(r, n // 2))
        torch.testing.assert_close(out[i], want)
        torch.testing.assert_close(sizes[i], want_sizes)
    torch.testing.assert_close(sizes.sum(1), size.sum(1))  # merged tokens keep their sizes


def test_proportional_attention_counts_a_merged_token_as_its_patches():
    """A token of size 2 under log-size attention is the same, to every query, as the token twice."""
    model = vit()
    blk = model.blocks[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 32, generator=g)
    twice = torch.cat([x, x[:, 5:]], dim=1)  # the last token duplicated
    size = torch.ones(2, 6, 1)
    size[:, 5] = 2
    out, _, _ = _attend(blk, x, size.log().transpose(1, 2).unsqueeze(1))
    ref, _, _ = _attend(blk, twice, None)
    torch.testing.assert_close(out, ref[:, :6])


def test_evit_cls_attention_and_fusion_by_hand():
    model = vit()
    blk = model.blocks[0]
    x = model.embed(torch.randn(2, 3, 32, 32))  # (2, 65, 32)
    out, q, k = _attend(blk, x, None)
    probs = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)  # (B, H, N, N)
    cls_attn = probs[:, :, 0, 1:].mean(1)  # (B, 64)
    kept_x, kept = evit_select(x, cls_attn, 0.5, prefix=1)
    assert kept_x.shape == (2, 1 + 32 + 1, 32)
    for i in range(2):
        top = cls_attn[i].argsort(descending=True)
        assert kept[i].tolist() == top[:32].tolist()
        rest = top[32:]
        w = cls_attn[i, rest]
        torch.testing.assert_close(kept_x[i, -1], (x[i, 1 + rest] * w[:, None]).sum(0) / w.sum())
        torch.testing.assert_close(kept_x[i, 1:33], x[i, 1 + top[:32]])
    # the block computes the same cls attention (without the (N, N) matrix)
    y = x + out
    blk_out, _ = reduced_block(blk, x, torch.ones(2, 65, 1), prefix=1, keep_rate=0.5)
    want, _ = evit_select(y, cls_attn, 0.5, prefix=1)
    torch.testing.assert_close(blk_out, want + blk.mlp(blk.norm2(want)))


@pytest.mark.parametrize("kw, tokens", [(dict(tome_r=6), 65 - 12), (dict(evit_keep_rate=0.5), 1 + 17 + 1)])
def test_model_trains_with_fewer_tokens(kw, tokens):
    model = vit(**kw, num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, tokens, 32)
    # depth 2: EViT at blocks {0, 1}: 64 patches -> 32 + 1 fused -> ceil(0.5 * 33) = 17 + 1 fused (the earlier
    # fused token is a candidate like any other, as in EViT)
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "mask_token" not in n)
    ckpt = vit(**kw, num_classes=10).train()
    ckpt.load_state_dict(model.state_dict())
    ckpt.set_grad_checkpointing(True)
    torch.testing.assert_close(ckpt(x), model(x))
    rebuilt = type(model)(**model.hparams())
    assert rebuilt.hparams() == model.hparams()


def test_refusals_name_the_switch():
    model = vit(tome_r=4)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="tome_r=4"):
        model.forward_intermediates(x)
    with pytest.raises(ValueError, match="tome_r=4"):
        model.forward_features(x, mask=torch.zeros(1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="tome_r=4 has no ViTModel equivalent"):
        check_vit_exportable(model)
    with pytest.raises(ValueError, match="evit_keep_rate=0.7 has no ViTModel equivalent"):
        check_vit_exportable(vit(evit_keep_rate=0.7))
    with pytest.raises(ValueError, match="set one of them"):
        vit(tome_r=2, evit_keep_rate=0.5)
    with pytest.raises(ValueError, match="global_pool='token'"):
        create_model("vit_test_patch4", tome_r=2, global_pool="avg")
    with pytest.raises(ValueError, match="evit_locs"):
        vit(evit_keep_rate=0.5, evit_locs=[5])
    check_vit_exportable(vit())  # the plain model still exports


def test_mae_sparse_encoding_with_merging():
    """ids_keep (MAE, FLIP patch dropout) and merging compose: merging runs over the kept tokens."""
    model = vit(tome_r=3)
    keep = torch.stack([torch.randperm(64)[:16] for _ in range(2)])
    assert model.forward_features(torch.randn(2, 3, 32, 32), ids_keep=keep).shape == (2, 1 + 16 - 6, 32)
    assert math.isfinite(model(torch.randn(2, 3, 32, 32)).sum().item())


def test_clip_export_refuses_a_merging_image_tower():
    from models.two_tower_hf import two_tower_to_hf

    model = create_model("clip_test", image_kwargs={"tome_r": 2})
    with pytest.raises(ValueError, match="tome_r=2 has no .* equivalent"):
        two_tower_to_hf(model)


def test_default_evit_blocks_follow_the_depth_on_rebuild():
    """hparams keep evit_locs=None when it was defaulted: a rebuild at another depth (benchmarks and smoke sizes
    override depth) gets that depth's blocks; blocks given explicitly are kept and checked."""
    model = vit(evit_keep_rate=0.5)  # depth 2: blocks [0, 1]
    assert model.evit_locs == [0, 1] and model.hparams()["evit_locs"] is None
    shallow = type(model)(**{**model.hparams(), "depth": 1})
    assert shallow.evit_locs == [0]
    given = vit(evit_keep_rate=0.5, evit_locs=[1, 1])
    assert given.hparams()["evit_locs"] == [1]
    with pytest.raises(ValueError, match="evit_locs: block indices \\[1\\] are outside 0..0"):
        type(given)(**{**given.hparams(), "depth": 1})


@pytest.mark.parametrize("kw", [dict(tome_r=2), dict(evit_keep_rate=0.5)])
def test_mae_objective_refuses_reduction_naming_the_switch(tmp_path, kw):
    """MAE's decoder scatters one encoder token per kept patch back to its place: merged or pruned tokens would
    land on the wrong patches, silently. The objective refuses when the config is read."""
    from pretrain.build import load_config
    from pretrain.errors import ConfigError

    key, value = next(iter(kw.items()))
    sets = [f'model.kwargs={{"{key}": {value}}}', f"run.output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=f"model.kwargs.{key}: MAE's decoder needs one encoder token"):
        load_config("configs/mae_tiny.yaml", sets)  # checks the config by building it (on the meta device)
