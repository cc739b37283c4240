import pytest
import torch

from models import create_model
from models.mae import mae_loss, num_kept, patchify, random_masking, unpatchify
from pretrain.objectives.mae import MAE, MAEConfig


def make_mae(ratio=0.75, **kw):
    torch.manual_seed(0)
    vit = create_model("vit_test_patch4", img_size=16, in_chans=1, pos_embed="sincos")
    return MAE(vit, MAEConfig(mask_ratio=ratio, decoder_dim=32, decoder_depth=1, decoder_heads=2, **kw))


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_masking_invariants(ratio):
    noise = torch.rand(4, 49, generator=torch.Generator().manual_seed(0))
    ids_keep, mask, ids_restore = random_masking(noise, ratio)
    keep = num_kept(49, ratio)
    assert ids_keep.shape == (4, keep)
    assert (mask.sum(1) == 49 - keep).all()  # same count masked in every sample
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for b in range(4):
        assert (mask[b, ids_keep[b]] == 0).all()  # kept patches are exactly the unmasked ones
        assert len(set(ids_keep[b].tolist())) == keep
        kept_noise = noise[b, ids_keep[b]]
        assert kept_noise.max() < noise[b, mask[b].bool()].min()  # lowest noise is kept
    shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(shuffle, 1, ids_restore), torch.arange(49).expand(4, -1))


def test_masks_differ_across_samples_and_draws():
    a = random_masking(torch.rand(8, 49), 0.75)[1]
    b = random_masking(torch.rand(8, 49), 0.75)[1]
    assert not torch.equal(a, b)
    assert len({tuple(row.tolist()) for row in a}) > 1


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    torch.testing.assert_close(unpatchify(p, 4, 3), x)
    # patch 1 is the top-right 4x4 block, flattened row-major with channels last
    torch.testing.assert_close(p[0, 1], x[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))


def test_loss_counts_only_masked_patches():
    target = torch.randn(2, 16, 12)
    pred = torch.randn(2, 16, 12)
    mask = torch.zeros(2, 16)
    mask[:, :4] = 1
    base = mae_loss(pred, target, mask, norm_pix=False)
    pred2 = pred.clone()
    pred2[:, 4:] += 10  # visible patches: no effect
    assert mae_loss(pred2, target, mask, norm_pix=False) == base
    expected = ((pred[:, :4] - target[:, :4]) ** 2).mean()
    torch.testing.assert_close(base, expected)
    # normalized-pixel target: per-patch zero mean, unit (unbiased) variance
    t = target[:, :4]
    normed = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(
        mae_loss(pred, target, mask, norm_pix=True), ((pred[:, :4] - normed) ** 2).mean()
    )


def test_objective_output_and_learning():
    mae = make_mae()
    x = torch.randn(4, 1, 16, 16)
    noise = torch.rand(4, 16)
    out = mae({"image": x}, noise=noise)
    assert out["loss"].ndim == 0 and out["pred"].shape == (4, 16, 16) and out["mask"].sum() == 4 * 12
    again = mae({"image": x}, noise=noise)
    assert torch.equal(out["loss"], again["loss"])  # given noise, deterministic
    # masked pixels do not reach the encoder: changing them changes the target, not the latent
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = mae({"image": x}, noise=noise)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    visuals = mae.visuals({"image": x}, out)
    grid = visuals["mae/reconstruction"]
    assert grid.shape == (3, 4 * 16, 3 * 16) and 0 <= grid.min() and grid.max() <= 1


def test_mae_rejects_non_vit_backbone():
    with pytest.raises(ValueError, match="ViT-style"):
        MAE(torch.nn.Linear(3, 3), MAEConfig())
    from pretrain.build import load_config
    from pretrain.config import ConfigError
    from tests.conftest import TINY

    # named at config time, with the objectives that can train it
    with pytest.raises(
        ConfigError, match="'mae' cannot train model.name 'convnext_test'.*objectives that can:.*simmim"
    ):
        load_config(TINY, ["model.name=convnext_test", "model.kwargs={}"])
