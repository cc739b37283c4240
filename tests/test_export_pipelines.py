"""What a user does with the venv and an export, in a fresh Python that imports nothing of Tessera: import
transformers' vision classes, streaming and torchvision; load an export with AutoImageProcessor and run
transformers' pipelines on it; read its model card. Tessera's own outputs are computed here, in the test process,
and compared."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain import export
from pretrain.data.sources import get_dataset
from pretrain.data.transforms import ImageTransform
from pretrain.train import main
from tests.conftest import ROOT, read_metrics, tiny_args

pytestmark = pytest.mark.usefixtures("hf_offline")
TESSERA = {"pretrain", "models", "ops", "launch"}


def fresh_python(code: str, cwd: Path) -> dict:
    """Run `code` in a new interpreter of this venv, outside the repo; it prints one JSON line. Also reports
    which of Tessera's packages ended up imported (none may be)."""
    report = f"sorted({{m.split('.')[0] for m in _s.modules}} & {TESSERA!r})"
    code += f"\nimport sys as _s, json as _j\nprint(_j.dumps({report}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    *_, result, imported = proc.stdout.strip().splitlines()
    assert json.loads(imported) == [], f"the user's script imported Tessera's {imported}"
    return json.loads(result)


def test_a_plain_python_imports_the_vision_stack(tmp_path):
    """Defect: `from transformers import SwinModel` and `import streaming` failed in the venv unless Tessera was
    imported first (the CUDA-built torchvision on the CPU torch). The hook installed by scripts/setup.sh fixes
    that, without importing torch at interpreter start."""
    out = fresh_python(
        "import json, torch\n"
        "from transformers import SwinModel, ViTMAEForPreTraining, ViTImageProcessorFast, pipeline\n"
        "import streaming\n"
        "import torchvision, torchvision.transforms.v2.functional as F\n"
        "x = F.resize(torch.zeros(1, 8, 8, dtype=torch.uint8), [4, 4], antialias=True)\n"
        "print(json.dumps({'swin': SwinModel.__name__, 'resized': list(x.shape)}))",
        tmp_path,
    )
    assert out == {"swin": "SwinModel", "resized": [1, 4, 4]}
    # nothing heavy at start: no torch, and probing for torchvision (as libraries do) imports nothing either
    out = fresh_python(
        "import importlib.util, json, sys\n"
        "start = 'torch' in sys.modules\n"
        "importlib.util.find_spec('torchvision')\n"
        "print(json.dumps([start, 'torch' in sys.modules, 'torchvision' in sys.modules]))",
        tmp_path,
    )
    assert out == [False, False, False]


def test_hook_installs_into_a_site_folder_and_out_again(tmp_path):
    from ops import torchvision_hook as hook

    written = hook.install_into_venv(str(tmp_path))
    assert sorted(Path(p).name for p in written) == [hook.INSTALLED_NAME + ".py", hook.PTH_NAME]
    assert (tmp_path / hook.PTH_NAME).read_text().startswith(f"import {hook.INSTALLED_NAME};")
    assert list((tmp_path / "__pycache__").glob(hook.INSTALLED_NAME + ".*.pyc"))  # no start compiles it
    hook.install_into_venv(str(tmp_path))  # idempotent
    hook.uninstall_from_venv(str(tmp_path))
    assert not list(tmp_path.glob("*.py*")) and not list((tmp_path / "__pycache__").iterdir())


def digit_png(folder: Path, size: int, index: int = 3) -> Path:
    """A real digit from the test split, upscaled (nearest) to `size` px, saved as a grayscale PNG."""
    sample = list(get_dataset("digits").samples("test", max_samples=index + 1))[index]
    path = folder / f"digit_{size}.png"
    sample["image"].resize((size, size), Image.NEAREST).save(path)
    return path


def tessera_pixels(path: Path, size: int, dataset: str = "digits") -> torch.Tensor:
    """Tessera's eval transform of the image, converted to the dataset's mode as its converter does: (1, C, S, S)."""
    info = get_dataset(dataset)
    img = Image.open(path).convert("L" if info.channels == 1 else "RGB")
    return ImageTransform(size, info.mean, info.std)(img).unsqueeze(0)


@pytest.fixture(scope="module")
def classifier_export(tmp_path_factory, digits_shards):
    """A supervised ConvNeXt on digits, trained a few steps and exported through the CLI."""
    tmp = tmp_path_factory.mktemp("classifier")
    run, out = tmp / "run", tmp / "hf"
    args = [
        str(ROOT / "configs" / "classify_tiny.yaml"),
        *("--set", f"run.output_dir={run}", "--set", f"data.local={digits_shards}"),
        *("--set", "run.progress=false", "--set", "train.max_steps=6", "--set", "checkpoint.interval=6"),
    ]
    assert main(args) == 0
    assert export.main([str(run), str(out)]) == 0
    return run, out


def test_pipelines_on_a_classifier_export(classifier_export, tmp_path):
    run, out = classifier_export
    png = digit_png(tmp_path, 32)  # already the model's size: the processor does not resize it
    theirs = fresh_python(
        "import json\nfrom PIL import Image\n"
        "from transformers import AutoImageProcessor, pipeline\n"
        f"out, png = {str(out)!r}, {str(png)!r}\n"
        "proc = AutoImageProcessor.from_pretrained(out)\n"
        "pixels = proc(Image.open(png), return_tensors='pt').pixel_values\n"
        "scores = pipeline('image-classification', model=out)(png, top_k=10)\n"
        "features = pipeline('image-feature-extraction', model=out)(png)\n"
        "print(json.dumps({'processor': type(proc).__name__, 'pixels': pixels.tolist(), 'scores': scores, "
        "'features': features}))",
        tmp_path,
    )
    model, meta = export.load_checkpoint_model(run)
    x = tessera_pixels(png, 32)  # (1, 1, 32, 32)
    assert theirs["processor"] == "ViTImageProcessorFast"
    pixels = torch.tensor(theirs["pixels"])  # (1, 3, 32, 32): the gray image as R = G = B
    assert pixels.shape == (1, 3, 32, 32)
    for c in range(3):
        torch.testing.assert_close(pixels[:, c : c + 1], x, atol=1e-6, rtol=0)
    with torch.no_grad():
        probs = model.backbone(x).softmax(-1)[0]
        feats = model.backbone.forward_features(x)
    assert {s["label"] for s in theirs["scores"]} == {str(d) for d in range(10)}  # the dataset's class names
    for s in theirs["scores"]:
        assert s["score"] == pytest.approx(probs[int(s["label"])].item(), abs=1e-5)
    torch.testing.assert_close(torch.tensor(theirs["features"]), feats, atol=1e-5, rtol=0)


def test_processor_resizes_and_converts_like_tessera(classifier_export, tmp_path):
    """A smaller image is resized bilinearly as Tessera does (up to uint8 rounding of the resized pixels); a
    colour image goes through PIL's grayscale weights inside the model, as Tessera's converter did."""
    run, out = classifier_export
    small = digit_png(tmp_path, 20)
    rng = np.random.default_rng(0)
    color = tmp_path / "color.png"
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8), "RGB").save(color)
    theirs = fresh_python(
        "import json\nfrom PIL import Image\n"
        "from transformers import AutoImageProcessor, pipeline\n"
        f"out = {str(out)!r}\n"
        "proc = AutoImageProcessor.from_pretrained(out)\n"
        f"small = proc(Image.open({str(small)!r}), return_tensors='pt').pixel_values\n"
        f"scores = pipeline('image-classification', model=out)({str(color)!r}, top_k=10)\n"
        "print(json.dumps({'small': small.tolist(), 'scores': scores}))",
        tmp_path,
    )
    std = get_dataset("digits").std[0]
    small_theirs, small_ours = torch.tensor(theirs["small"])[:, :1], tessera_pixels(small, 32)
    assert (small_theirs - small_ours).abs().max() <= 1.01 / 255 / std  # at most one uint8 step apart
    model, _ = export.load_checkpoint_model(run)
    with torch.no_grad():
        probs = model.backbone(tessera_pixels(color, 32)).softmax(-1)[
            0
        ]  # Tessera: convert("L"), then the model
    for s in theirs["scores"]:  # L rounds each pixel to a byte; the exported model does not
        assert s["score"] == pytest.approx(probs[int(s["label"])].item(), abs=2e-3)


def test_classifier_model_card_reads_the_run(classifier_export):
    run, out = classifier_export
    card = (out / "README.md").read_text()
    last = read_metrics(run)[-1]
    meta = json.loads((out / "tessera.json").read_text())
    assert "pipeline_tag: image-classification" in card
    assert f"| final loss | {last['loss']:.4f} at step 6 |" in card
    assert f"{last['samples_seen']:,} samples seen" in card and meta["samples_seen"] == last["samples_seen"]
    assert "`convnext_test`" in card and "`digits`" in card and "`classify`" in card
    assert "ConvNextForImageClassification.from_pretrained" in card  # the class that loads it cleanly
    assert "| classes | 10: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 |" in card
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(d): str(d) for d in range(10)}


def test_mae_export_serves_features_and_says_how(tmp_path, digits_shards):
    run, out = tmp_path / "run", tmp_path / "hf"
    assert main(tiny_args(run, digits_shards, "train.max_steps=4", "checkpoint.interval=4")) == 0
    assert export.main([str(run), str(out)]) == 0
    png = digit_png(tmp_path, 16)
    theirs = fresh_python(
        "import json\nfrom PIL import Image\n"
        "from transformers import AutoImageProcessor, ViTModel, pipeline\n"
        f"out, png = {str(out)!r}, {str(png)!r}\n"
        "_, info = ViTModel.from_pretrained(out + '/encoder', output_loading_info=True)\n"
        "mae_pixels = AutoImageProcessor.from_pretrained(out)(Image.open(png), return_tensors='pt').pixel_values\n"
        "features = pipeline('image-feature-extraction', model=out + '/encoder')(png)\n"
        "pooled = pipeline('image-feature-extraction', model=out + '/encoder')(png, pool=True)\n"
        "print(json.dumps({'info': info, 'mae_pixels': mae_pixels.tolist(), 'features': features, "
        "'pooled': pooled}))",
        tmp_path,
    )
    assert not any(theirs["info"].values()), theirs["info"]  # no pooler (or anything) newly initialized
    model, _ = export.load_checkpoint_model(run)
    x = tessera_pixels(png, 16)
    torch.testing.assert_close(
        torch.tensor(theirs["mae_pixels"]), x, atol=1e-6, rtol=0
    )  # the MAE's 1 channel
    with torch.no_grad():
        feats = model.backbone.forward_features(x)
    torch.testing.assert_close(torch.tensor(theirs["features"]), feats, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(theirs["pooled"]), feats[:, 0], atol=1e-5, rtol=0)
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-feature-extraction" in card and "`mae` (mask_ratio=0.75" in card
    assert f"| final loss | {read_metrics(run)[-1]['loss']:.4f} at step 4 |" in card
    assert f'ViTModel.from_pretrained("{out}/encoder")' in card


def test_dataset_class_names():
    names = get_dataset("fashion_mnist").class_names("train")
    assert names[0] == "T-shirt/top" and names[9] == "Ankle boot" and len(names) == 10
    assert export.class_names({"dataset": "digits"}, {}) == [str(d) for d in range(10)]
    assert export.class_names({"dataset": "digits"}, {"classes": ["a", "b"]}) == ["a", "b"]  # the run's own


def test_python_api_writes_the_processor_when_given_the_data(tmp_path):
    from models import create_model
    from pretrain.data.config import DataConfig

    vit = create_model("vit_test_patch4", img_size=16, in_chans=1)
    export.to_hf(vit, tmp_path / "plain")  # the exact model, as it is: no processor
    assert not (tmp_path / "plain" / "preprocessor_config.json").exists()
    export.to_hf(vit, tmp_path / "ready", data=DataConfig(dataset="digits", image_size=16))
    proc = json.loads((tmp_path / "ready" / "preprocessor_config.json").read_text())
    assert proc["size"] == {"height": 16, "width": 16} and proc["image_mean"] == [0.3053] * 3
    assert json.loads((tmp_path / "ready" / "config.json").read_text())["num_channels"] == 3


# ---- image-text: a CLIP run's export and transformers' zero-shot pipeline -----------------------------------


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory):
    """configs/clip_tiny.yaml trained 2 steps on 64 emoji pairs, exported through the CLI (CLIPModel + processor)."""
    from pretrain.data import DataConfig, convert

    tmp = tmp_path_factory.mktemp("clip")
    shards, run, out = tmp / "emoji64", tmp / "run", tmp / "hf"
    convert("emoji", "train", str(shards), max_samples=64, data=DataConfig(dataset="emoji"))
    args = [
        str(ROOT / "configs" / "clip_tiny.yaml"),
        *("--set", f"run.output_dir={run}", "--set", f"data.local={shards}", "--set", "data.max_samples=64"),
        *("--set", "run.progress=false", "--set", "train.max_steps=2", "--set", "checkpoint.interval=2"),
    ]
    assert main(args) == 0
    assert export.main([str(run), str(out)]) == 0
    return run, out


@pytest.mark.slow  # ~30 s: emoji conversion, 2 training steps, and a fresh Python importing transformers
def test_zero_shot_pipeline_on_a_clip_export(clip_export, tmp_path):
    """pipeline("zero-shot-image-classification") on the export, offline in a plain Python, scores an emoji
    render against the emoji groups as Tessera's model does (its eval transform; the pipeline's prompts tokenized
    by Tessera's data layer; softmax of the scaled cosine similarities)."""
    from pretrain.data import DataConfig, tokenize_captions, tokenizer_info

    run, out = clip_export
    sample = next(iter(get_dataset("emoji").samples("test", max_samples=1)))
    png = tmp_path / "emoji.png"
    sample["image"].resize((32, 32), Image.BILINEAR).save(
        png
    )  # the model's size: the processor does not resize
    labels = get_dataset("emoji").class_names("train")
    theirs = fresh_python(
        "import json\nfrom transformers import AutoProcessor, CLIPModel, pipeline\n"
        f"out, png = {str(out)!r}, {str(png)!r}\n"
        "_, info = CLIPModel.from_pretrained(out, output_loading_info=True)\n"
        "proc = AutoProcessor.from_pretrained(out)\n"
        f"scores = pipeline('zero-shot-image-classification', model=out)(png, candidate_labels={labels!r})\n"
        "print(json.dumps({'info': info, 'processor': type(proc).__name__, 'scores': scores}))",
        tmp_path,
    )
    assert not any(theirs["info"].values()), theirs["info"]
    assert theirs["processor"] == "CLIPProcessor"
    model, meta, cfg = export.load_checkpoint_model(run, with_config=True)
    tower = model.backbone
    prompts = [f"This is a photo of {label}." for label in labels]  # the pipeline's default template
    ids, mask, _ = tokenize_captions(prompts, tokenizer_info(DataConfig(dataset="emoji")), cfg.data.text_len)
    with torch.no_grad():
        image = tower.encode_image(tessera_pixels(png, 32, "emoji"))
        probs = (tower.scale_and_bias()[0] * image @ tower.encode_text(ids, mask).T).softmax(-1)[0]
    assert sorted(s["label"] for s in theirs["scores"]) == sorted(labels)
    for s in theirs["scores"]:
        assert s["score"] == pytest.approx(probs[labels.index(s["label"])].item(), abs=1e-5)
    card = (out / "README.md").read_text()
    assert "pipeline_tag: zero-shot-image-classification" in card and "`clip`" in card
    assert f'CLIPModel.from_pretrained("{out}")' in card and "zero-shot-image-classification" in card
    assert f"cut to {cfg.data.text_len} tokens keeping EOS last" in card
    assert json.loads((out / "tessera.json").read_text())["step"] == meta["step"] == 2
