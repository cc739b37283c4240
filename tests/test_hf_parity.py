"""Every family with a Hugging Face twin, generically: the export loads offline with transformers' own class and
matches Tessera to 1e-5 (last hidden state, every stage, pooled, logits); import gives the model back; and a
trained checkpoint goes through `python -m pretrain.export` (family-specific checks live in tests/test_<family>.py)."""

import json
import re

import pytest
import torch

from models import MODELS, create_model, list_models
from models.hf import HF_ADAPTERS
from ops.compat import import_transformers
from pretrain import export
from pretrain.train import main
from tests.conftest import ROOT, trained_like

tf = import_transformers()
# image families; a text family's twin is tested in its own tests/test_<family>.py
IMAGE_FAMILIES = [
    f for f in HF_ADAPTERS.names() if getattr(HF_ADAPTERS.get(f).model_cls, "modality", "") != "text"
]
CASES = [
    (family, name)
    for family in IMAGE_FAMILIES
    for name in list_models("*_test*")
    if MODELS.get(name).builds is HF_ADAPTERS.get(family).model_cls
]


pytestmark = pytest.mark.usefixtures("hf_offline")


def test_every_family_is_covered():
    assert {f for f, _ in CASES} == set(IMAGE_FAMILIES)
    assert {"vit", "swin", "swinv2", "convnext", "convnextv2", "pvt_v2", "poolformer"} <= set(
        HF_ADAPTERS.names()
    )


def assert_parity(model, hf, adapter, x, atol, hf_x=None):
    """The HF model's outputs on `hf_x` (default: `x`) equal Tessera's on `x`."""
    with torch.no_grad():
        theirs = adapter.hf_outputs(hf, x if hf_x is None else hf_x)
        feats = model.forward_features(x)
        torch.testing.assert_close(theirs["features"], feats, atol=atol, rtol=0)
        stages = model.forward_intermediates(x)
        assert len(theirs["stages"]) == len(stages)
        for i, (a, b) in enumerate(zip(theirs["stages"], stages)):
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m, i=i: f"stage {i}: {m}")
        torch.testing.assert_close(
            theirs["pooled"], model.forward_head(feats, pre_logits=True), atol=atol, rtol=0
        )
        if "logits" in theirs or model.hparams().get("num_classes", 0):
            torch.testing.assert_close(theirs["logits"], model(x), atol=atol, rtol=0)


@pytest.mark.parametrize("family, name", CASES)
@pytest.mark.parametrize("num_classes", [0, 7])
def test_export_loads_with_transformers_and_matches(tmp_path, family, name, num_classes):
    torch.manual_seed(0)
    adapter = HF_ADAPTERS.get(family)
    model = trained_like(create_model(name, num_classes=num_classes))
    size = model.hparams()["img_size"]
    export.to_hf(model, tmp_path)
    arch = json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    # a head exports as <Family>ForImageClassification (DeiT: ...WithTeacher); without one as <Family>Model,
    # except where the HF base model drops weights Tessera trains (PoolFormerModel and CvtModel have no final norm:
    # see models/poolformer_hf.py, models/cvt_hf.py)
    assert arch in adapter.archs and (is_classifier(arch) or not num_classes)
    hf, info = getattr(tf, arch).from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key in the class exported
    # and in AutoModel (what feature-extraction pipelines use)
    if not num_classes and family not in ("poolformer", "cvt"):
        _, info = tf.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
        assert not any(info.values()), info
    hf = hf.eval()
    other = [] if getattr(model, "fixed_input_size", False) else [(1, size + 4, size - 4)]
    for shape in [(2, size, size), *other]:  # native size, and another one where the family allows
        x = torch.randn(shape[0], model.hparams()["in_chans"], *shape[1:])
        assert_parity(model, hf, adapter, x, atol=1e-5)
    back = export.from_hf(tmp_path)
    assert type(back) is type(model)
    x = torch.randn(2, model.hparams()["in_chans"], size, size)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family, name", CASES)
def test_trained_checkpoint_exports_through_the_cli(tmp_path, digits_shards, family, name):
    run = tmp_path / "run"
    args = [
        str(ROOT / "configs" / "classify_tiny.yaml"),
        *(
            "--set",
            f"model.name={name}",
            "--set",
            f"run.output_dir={run}",
            "--set",
            f"data.local={digits_shards}",
        ),
        *("--set", "run.progress=false", "--set", "train.max_steps=2", "--set", "checkpoint.interval=2"),
    ]
    assert main(args) == 0
    assert export.main([str(run), str(tmp_path / "hf")]) == 0
    meta = json.loads((tmp_path / "hf" / "tessera.json").read_text())
    assert meta["step"] == 2
    model, _ = export.load_checkpoint_model(run)
    backbone = model.backbone
    arch = json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"][0]
    assert is_classifier(arch)
    hf = getattr(tf, arch).from_pretrained(tmp_path / "hf").eval()
    # a grayscale run exports a model taking RGB (pipelines convert every image to RGB): on a gray image given
    # as R = G = B it computes exactly what the 1-channel model computes
    assert hf.config.num_channels == 3 and hf.config.tessera_gray_from_rgb == [0.299, 0.587, 0.114]
    x = torch.randn(2, 1, 32, 32)
    rgb = x.expand(-1, 3, -1, -1)
    assert_parity(backbone, hf, HF_ADAPTERS.get(family), x, atol=1e-5, hf_x=rgb)
    base = getattr(tf, adapter_base(arch)).from_pretrained(tmp_path / "hf").eval()  # the bare model loads too
    with torch.no_grad():  # ... with the same features
        theirs = HF_ADAPTERS.get(family).hf_outputs(base, rgb)["features"]
        torch.testing.assert_close(theirs, backbone.forward_features(x), atol=1e-5, rtol=0)
        back = export.from_hf(tmp_path / "hf")  # and import gives the 1-channel model back
        assert back.hparams()["in_chans"] == 1
        torch.testing.assert_close(back(x), backbone(x), atol=1e-5, rtol=0)


def is_classifier(arch: str) -> bool:
    """<Family>ForImageClassification, or DeiTForImageClassificationWithTeacher (a ViT with a distillation
    token)."""
    return arch.endswith(("ForImageClassification", "ForImageClassificationWithTeacher"))


def adapter_base(arch: str) -> str:
    return re.sub(r"ForImageClassification(WithTeacher)?$", "Model", arch)
