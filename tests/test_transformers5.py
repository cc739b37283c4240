"""Every Tessera Hugging Face export loads in the newest transformers 5 (a user's venv) with Tessera's outputs.

Tessera itself pins transformers 4.57 (mosaicml-streaming needs <5); people who download an export run 5.x. The
slow test builds .venv-tf5 (scripts/tf5-venv.sh: transformers 5 pinned by requirements/constraints-tf5.txt, no
Tessera), exports every export target below here, writes Tessera's own outputs in the HF models' layouts
(cross-checked against transformers 4.57 here), and runs tests/tf5_check.py under .venv-tf5 on them.

A new export target is one entry of `export_targets()`: a name, the Tessera model, and a function that exports it
and returns its manifest cases (`backbone_cases`, `pipeline_cases`, `mae_cases`, `simmim_cases` and `text_cases`
are the kinds). SimMIM is exported for every family transformers has a *ForMaskedImageModeling of
(pretrain.export.MIM_TO_HF: ViT, Swin, Swin V2; not a DeiT, pretrain.export.mim_exporter).
A ViT with DeiT's distillation token (`deit_test`, in the "vit" family) exports as DeiTModel /
DeiTForImageClassificationWithTeacher: its cases also compare cls_logits and distillation_logits.
Text families (adapter model_cls.modality == "text": Llama, ModernBERT) are exported as a text run's
`python -m pretrain.export` exports them, with the run's tokenizer (`to_hf(..., data=text_data())`): their cases
also check AutoTokenizer against Tessera's tokenizer and transformers' text-generation / fill-mask pipeline
against Tessera's model.
Two-tower models (family "two_tower": CLIPModel, SiglipModel, VisionTextDualEncoderModel with each of its image
towers) are exported as an image-text run's export is, with the processor (`to_hf(..., data=image_text_data())`):
their cases compare the normalized embeddings and logits, the image processor, the tokenizer and, for CLIP and
SigLIP, transformers' zero-shot-image-classification pipeline (`two_tower_cases`).
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from models import MODELS, create_model, list_models
from models.hf import HF_ADAPTERS
from models.mae import random_masking
from ops.compat import import_transformers
from pretrain.export import MIM_TO_HF, mim_exporter, to_hf
from pretrain.objectives.mae import MAE, MAEConfig
from pretrain.objectives.simmim import SimMIM, SimMIMConfig
from tests.conftest import ROOT, trained_like

# ---- what is exported: one entry per export target -------------------------------------------------------


@dataclass(frozen=True)
class ExportTarget:
    name: str  # unique, also names its cases: "swin/swin_test/classes=7"
    family: str  # the HF_ADAPTERS family it covers, or "mae"
    build: Callable[[], nn.Module]  # the Tessera model to export, weights perturbed (trained_like), eval()
    cases: Callable[[nn.Module, Path, CaseWriter], list[dict]]  # export into the folder; -> manifest cases


def export_targets() -> list[ExportTarget]:
    """Every image family with an HF adapter (its CI-sized `*_test*` model, headless and with 7 classes), MAE,
    and every text family's `*_test*` model in each of its TEXT_VARIANTS, with the run's tokenizer."""
    targets = [
        ExportTarget(f"{family}/{name}/classes={n}", family, partial(_backbone, name, n), backbone_cases)
        for family in image_families()
        for name in family_test_models(family)
        for n in (0, 7)
    ]
    targets += [  # the demo's 1-channel sin-cos MAE, and a 3-channel one with learned position embeddings
        ExportTarget(f"mae/vit_test_patch4/{c}ch-{pos}", "mae", partial(_mae, c, pos), mae_cases)
        for c, pos in ((1, "sincos"), (3, "learned"))
    ]
    # what `python -m pretrain.export` writes for a run on grayscale data: an image processor, class names, the
    # model taking RGB (models.hf.rgb_from_gray), and transformers' pipelines on it
    targets += [
        ExportTarget(f"{family}/{name}/pipeline", family, partial(_backbone, name, 7, 1), pipeline_cases)
        for family in image_families()
        for name in family_test_models(family)
    ]
    targets.append(ExportTarget("mae/vit_test_patch4/pipeline", "mae", partial(_mae, 1, "sincos"), mae_cases))
    # SimMIM: the *ForMaskedImageModeling folder and its encoder/ (3 channels), and one run on grayscale data
    targets += [
        ExportTarget(f"simmim/{name}", "simmim", partial(_simmim, name, 3), simmim_cases)
        for name in simmim_test_models()
    ]
    targets.append(
        ExportTarget("simmim/swin_test/pipeline", "simmim", partial(_simmim, "swin_test", 1), simmim_cases)
    )
    # text: what `python -m pretrain.export` writes for a text run (weights, tokenizer, special ids in the config)
    targets += [
        ExportTarget(f"{family}/{name}/{variant}", family, partial(_text, name, kwargs), text_cases)
        for family in text_families()
        for name in family_test_models(family)
        for variant, kwargs in TEXT_VARIANTS.get(family, {"text": {}}).items()
    ]
    # image-text: what `python -m pretrain.export` writes for a two-tower run (model, processor, tokenizer)
    targets += [
        ExportTarget(
            f"two_tower/{name}/{variant}", "two_tower", partial(_two_tower, name, tower), two_tower_cases
        )
        for variant, (name, tower) in TWO_TOWER_VARIANTS.items()
    ]
    return targets


def family_test_models(family: str) -> list[str]:
    return [n for n in list_models("*_test*") if MODELS.get(n).builds is HF_ADAPTERS.get(family).model_cls]


def text_families() -> list[str]:
    return [f for f in HF_ADAPTERS.names() if getattr(HF_ADAPTERS.get(f).model_cls, "modality", "") == "text"]


def image_families() -> list[str]:
    return [f for f in HF_ADAPTERS.names() if f not in text_families()]


# the model kwargs each text family is exported with (a family not listed: its `*_test*` model as registered)
TEXT_VARIANTS = {
    "llama": {"untied": {"tie_embeddings": False}, "tied": {"tie_embeddings": True}},  # llama_test is GQA
    "modernbert": {"mlm": {}},
}


def _backbone(name: str, num_classes: int, in_chans: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    chans = {} if in_chans is None else {"in_chans": in_chans}
    return trained_like(create_model(name, num_classes=num_classes, **chans))


def text_data():
    """The text run's data config (a small byte-level BPE trained on WordNet), its tokenizer trained on first use."""
    from pretrain.data.config import DataConfig

    return DataConfig(dataset="wordnet", max_samples=2000, vocab_size=512, seq_len=128)


def _text(name: str, kwargs: dict) -> nn.Module:
    """A text backbone sized to the run's tokenizer (as pretrain/build.py builds one), weights perturbed."""
    from pretrain.data.tokenizer import ensure_tokenizer

    info = ensure_tokenizer(text_data())
    torch.manual_seed(0)
    return trained_like(create_model(name, vocab_size=info.vocab_size, **kwargs))


# variant: (two-tower size, image tower at its smoke size or None for the size's own); the dual encoder takes
# every family whose transformers *Model pools as Tessera does (models.two_tower_hf.DUAL_IMAGE_TOWERS)
TWO_TOWER_VARIANTS = {
    "clip": ("clip_test", None),
    "siglip": (
        "siglip_test",
        None,
    ),  # captions of 64 tokens (SIGLIP_TEXT_LEN), as the zero-shot pipeline pads
    **{
        f"dual-{t}": ("clip_test", t)
        for t in ("vit_test_patch4", "swin_test", "swinv2_test", "convnext_test")
    },
    "dual-convnextv2_test": ("clip_test", "convnextv2_test"),
}
TWO_TOWER_TEXT_LEN = 16
# transformers' zero-shot pipeline pads SigLIP prompts to 64 tokens (5.x ignores tokenizer_kwargs), and SiglipModel
# pools the last position: exact for a run whose captions are 64 tokens, SigLIP's own length
SIGLIP_TEXT_LEN = 64


def text_len_of(name: str) -> int:
    return SIGLIP_TEXT_LEN if name.startswith("siglip") else TWO_TOWER_TEXT_LEN


def image_text_data(image_size: int, text_len: int = TWO_TOWER_TEXT_LEN):
    """An image-text run's data config: emoji pairs, the CLIP BPE tokenizer, captions of `text_len` tokens."""
    from pretrain.data.config import DataConfig

    return DataConfig(dataset="emoji", image_size=image_size, text_len=text_len)


def _two_tower(name: str, image_tower: str | None) -> nn.Module:
    """A two-tower model at its smoke size, sized for the run's tokenizer as pretrain/build.py does, perturbed."""
    from pretrain.data.tokenizer import tokenizer_info

    info = tokenizer_info(image_text_data(32))
    args = dict(MODELS.get(name).smoke)
    if image_tower is not None:
        tower = dict(MODELS.get(image_tower).smoke)
        args.update(image_tower=image_tower, img_size=tower.pop("img_size", 32), image_kwargs=tower)
    causal = name.startswith("clip")
    args.update(vocab_size=info.vocab_size, context_length=text_len_of(name), pad_token_id=info.padding_id)
    args["eos_token_id"] = info.eos_id if causal else None
    torch.manual_seed(0)
    return trained_like(create_model(name, **args))


def simmim_test_models() -> list[str]:
    """The `*_test*` models a transformers MIM class holds the SimMIM of (not a DeiT: see mim_exporter)."""

    def has_mim(name: str) -> bool:
        with torch.device("meta"):
            return mim_exporter(create_model(name)) is not None

    return [n for f in image_families() for n in family_test_models(f) if has_mim(n)]


def _simmim(name: str, chans: int) -> nn.Module:
    """SimMIM on the registered size, 8 px mask cells (a multiple of every stem stride here), weights perturbed."""
    torch.manual_seed(0)
    backbone = create_model(name, in_chans=chans, mask_token=True)
    return trained_like(SimMIM(backbone, SimMIMConfig(mask_ratio=0.6, mask_patch_size=8), seed=0))


def _mae(chans: int, pos: str) -> nn.Module:
    torch.manual_seed(0)
    vit = create_model("vit_test_patch4", img_size=16, in_chans=chans, pos_embed=pos)
    cfg = MAEConfig(mask_ratio=0.75, decoder_dim=32, decoder_depth=2, decoder_heads=4)
    return trained_like(MAE(vit, cfg))


# ---- manifest cases ----------------------------------------------------------------------------------------

ATOL = 1e-5  # max-abs, fp32, both in transformers 5 (tests/tf5_check.py) and in the 4.57 cross-check here
# Auto classes tried, in order, for the one that loads a folder's own architecture
AUTO_CLASSES = ("AutoModelForImageClassification", "AutoModelForPreTraining", "AutoModel")
TEXT_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModel")
tf = import_transformers()


class CaseWriter:
    """Writes a case's tensors and cross-checks them against transformers 4.57 (what Tessera's venv has): a
    mismatch there is recorded in `problems` (a wrong layout mapping here, or a 4.57 export bug)."""

    def __init__(self, root: Path):
        self.root, self.problems, self.image_checked = root, [], set()

    def name(self, folder: Path) -> str:
        return str(folder.relative_to(self.root / "exports"))

    def save(self, tensors: dict[str, torch.Tensor], stem: str) -> str:
        from safetensors.torch import save_file

        path = self.root / "tensors" / f"{stem}.safetensors"
        path.parent.mkdir(exist_ok=True)
        # floats as fp32; integer tensors (input_ids, ids_restore) keep their dtype: a forward takes ids as int64
        tensors = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in tensors.items()}
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path))
        return str(path)

    def case(
        self,
        name: str,
        folder: Path,
        inputs: dict[str, torch.Tensor],
        loads: list[dict],
        ours: dict[str, torch.Tensor],
        fields: Callable[[nn.Module], dict[str, str]],
        forward_457: Callable | None = None,
    ) -> dict:
        """One manifest case. `ours`: Tessera's tensors by name; `fields(hf_model)`: output field -> name in
        `ours` for that HF class. Compared are the fields the 4.57 model returns (not None); `forward_457(hf,
        inputs)` stands in for the 4.57 forward where that one cannot run (transformers 5 runs the forward)."""
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        for load in loads:
            load.setdefault("kwargs", {})
            load.setdefault("allow_unexpected", [])
            load["inputs"], load["outputs"] = self._cross_check(
                name, folder, inputs, load, ours, fields, forward_457
            )
        case = dict(
            name=name,
            folder=str(folder),
            inputs=self.save(inputs, stem + ".inputs"),
            expected=self.save(ours, stem + ".expected"),
            loads=loads,
        )
        if (folder / "preprocessor_config.json").is_file() and folder not in self.image_checked:
            self.image_checked.add(folder)  # once per folder (its first case)
            self._image(case, folder, stem, ours)
        return case

    def _cross_check(self, name, folder, inputs, load, ours, fields, forward_457=None):
        cls = getattr(tf, load["cls"])
        hf, info = cls.from_pretrained(folder, output_loading_info=True, **load["kwargs"])
        hf = hf.float().eval()
        bad = {k: v for k, v in info.items() if v and k != "unexpected_keys"}
        extra = [k for k in info["unexpected_keys"] if not k.startswith(tuple(load["allow_unexpected"]))]
        if bad or extra:
            self.problems.append(f"{name}: 4.57 {load['cls']} loads with {bad} unexpected {extra}")
        params = inspect.signature(hf.forward).parameters
        used = [k for k in inputs if k in params]
        with torch.no_grad():
            out = (forward_457 or (lambda m, kw: m(**kw)))(hf, {k: inputs[k] for k in used})
        outputs = {}
        for field, key in fields(hf).items():
            got = getattr(out, field, None)
            if got is None:
                continue
            outputs[field] = key
            self._compare(f"{name}: 4.57 {type(hf).__name__}.{field} vs Tessera's {key}", got, ours[key])
        if not outputs:
            self.problems.append(f"{name}: 4.57 {type(hf).__name__} returned none of {sorted(fields(hf))}")
        return used, outputs

    def _image(self, case: dict, folder: Path, stem: str, ours: dict) -> None:
        """The folder's image processor on a PNG at the model's own size vs Tessera's eval transform of it, with
        the mean/std the export recorded (pretrain.data.transforms.ImageTransform: [0, 1], resize, normalize)."""
        from PIL import Image

        from pretrain.data.transforms import ImageTransform

        cfg = json.loads((folder / "config.json").read_text())
        pp = json.loads((folder / "preprocessor_config.json").read_text())
        if not {"image_mean", "image_std"} <= set(
            pp
        ):  # then tf5_check.py fails too: this folder has no image
            self.problems.append(f"{case['name']}: preprocessor_config.json has no image_mean/image_std")
            return
        # image-text models keep it in vision_config, and leave transformers' default (3) unsaved
        vision = cfg.get("vision_config", {})
        chans = int(cfg.get("num_channels", vision.get("num_channels", 3)))
        size = int(pp["size"]["height"])  # the processor's own size
        g = torch.Generator().manual_seed(7)
        pixels = torch.randint(0, 256, (size, size, chans), generator=g, dtype=torch.uint8).numpy()
        png = self.root / "tensors" / f"{stem}.png"
        Image.fromarray(pixels[..., 0] if chans == 1 else pixels, "L" if chans == 1 else "RGB").save(png)
        with Image.open(png) as im:
            want = ImageTransform(size, tuple(pp["image_mean"]), tuple(pp["image_std"]))(im).unsqueeze(0)
            what = f"{case['name']}: 4.57 AutoImageProcessor pixel_values vs Tessera's transform"
            try:
                proc = tf.AutoImageProcessor.from_pretrained(folder)
                self._compare(what, proc(images=im, return_tensors="pt")["pixel_values"], want)
            except Exception as e:  # recorded; transformers 5 is still checked
                self.problems.append(f"{what}: raised {type(e).__name__}: {e}")
        case["expected"] = self.save({**ours, "processor_pixel_values": want}, stem + ".expected")
        case["image"] = dict(png=str(png), expected="processor_pixel_values", atol=ATOL)

    def gray_png(self, size: int, stem: str) -> Path:
        """A gray PNG of random pixels at the model's size (so no resize: 1e-5 comparisons hold)."""
        from PIL import Image

        g = torch.Generator().manual_seed(11)
        pixels = torch.randint(0, 256, (size, size), generator=g, dtype=torch.uint8).numpy()
        png = self.root / "tensors" / f"{stem}.gray.png"
        png.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels, "L").save(png)
        return png

    def pipeline(
        self,
        case: dict,
        task: str,
        png: Path,
        want: torch.Tensor,
        labels: list[str] | None,
        call_kwargs: dict | None = None,
    ) -> None:
        """Add transformers' `task` pipeline on `png` to the case: classification scores by label must be `want`
        (probabilities, in label order; zero-shot: over `labels` as candidates), feature extraction must give
        `want`; `call_kwargs` go to the call too. Cross-checked here in 4.57."""
        from safetensors.torch import load_file

        case["expected"] = self.save(
            {**load_file(case["expected"]), "pipeline": want}, Path(case["expected"]).stem
        )
        case["pipeline"] = dict(task=task, png=str(png), expected="pipeline", labels=labels, atol=ATOL)
        case["pipeline"]["kwargs"] = kwargs = pipeline_kwargs(task, labels, call_kwargs)
        got = tf.pipeline(task, model=case["folder"])(str(png), **kwargs)
        what = f"{case['name']}: 4.57 pipeline({task!r})"
        if labels:
            if sorted(d["label"] for d in got) != sorted(labels):
                self.problems.append(f"{what}: labels {[d['label'] for d in got]} != {labels}")
                return
            got = torch.tensor([next(d["score"] for d in got if d["label"] == name) for name in labels])
        self._compare(what, torch.as_tensor(got), want)

    def tokenizer(self, case: dict, info, text: str) -> None:
        """Add the folder's tokenizer to the case: AutoTokenizer must encode `text` to the ids of Tessera's
        tokenizer (the run's `tokenizers` object), decode them to its decoding, and give its special tokens the
        ids Tessera's TokenizerInfo names. Cross-checked here in 4.57: hf_tokenizer(info), what the export saves,
        and AutoTokenizer of the folder."""
        from pretrain.data.tokenizer import ROLES, hf_tokenizer, load_tokenizer

        tok = load_tokenizer(info.path)
        ids = tok.encode(text).ids
        spec = dict(
            text=text,
            ids=ids,
            decoded=tok.decode(ids, skip_special_tokens=False),
            special_ids={role: getattr(info, f"{role}_id") for role in ROLES},
        )
        case["tokenizer"] = spec
        for what, hf_tok in (
            ("hf_tokenizer", hf_tokenizer(info)),
            ("AutoTokenizer", tf.AutoTokenizer.from_pretrained(case["folder"])),
        ):
            got = dict(
                ids=hf_tok(text)["input_ids"],
                decoded=hf_tok.decode(ids),
                special_ids={role: getattr(hf_tok, f"{role}_token_id") for role in ROLES},
            )
            for key, value in got.items():
                if value != spec[key]:
                    self.problems.append(
                        f"{case['name']}: 4.57 {what} {key} {value!r} != Tessera's {spec[key]!r}"
                    )

    def text_pipeline(self, case: dict, spec: dict, want: torch.Tensor | None) -> None:
        """Add transformers' text pipeline `spec` (see text_pipeline_spec) to the case; `want`: fill-mask's
        expected scores. Cross-checked here in 4.57."""
        if want is not None:
            from safetensors.torch import load_file

            case["expected"] = self.save(
                {**load_file(case["expected"]), "pipeline": want}, Path(case["expected"]).stem
            )
        case["pipeline"] = spec
        pipe = tf.pipeline(spec["task"], model=case["folder"])
        what = f"{case['name']}: 4.57 pipeline({spec['task']!r})"
        if spec["task"] == "fill-mask":
            out = pipe(spec["text"], top_k=spec["top_k"])
            got = dict(token_ids=[d["token"] for d in out], token_strs=[d["token_str"] for d in out])
            self._compare(f"{what} scores", torch.tensor([d["score"] for d in out]), want)
        else:  # text-generation
            got = dict(
                token_ids=pipe(spec["text"], return_tensors=True, **spec["kwargs"])[0]["generated_token_ids"],
                generated_text=pipe(spec["text"], **spec["kwargs"])[0]["generated_text"],
            )
        for key, value in got.items():
            if value != spec[key]:
                self.problems.append(f"{what}: {key} {value!r} != Tessera's {spec[key]!r}")

    def _compare(self, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        if got.shape != want.shape:
            self.problems.append(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        err = (got.double() - want.double()).abs().max().item()
        if not err <= ATOL:  # (NaN fails too)
            self.problems.append(f"{what}: max abs error {err:.3g} > {ATOL:g}")


def standard_loads(folder: Path, autos: tuple[str, ...] = AUTO_CLASSES) -> list[dict]:
    """How a user loads the folder: its `architectures[0]` class and the Auto class (the first of `autos`) that
    gives the same, both strictly; and, where that class has a head, the base model (AutoModel), which may drop
    the head's keys."""
    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    hf = getattr(tf, arch).from_pretrained(folder)
    config_cls = type(hf.config)

    def gives(auto: str) -> bool:
        # a config may map to several classes (DeiT: two classifiers), config.json's architectures picks one
        found = getattr(tf, auto)._model_mapping.get(config_cls, None)
        return found is type(hf) or (isinstance(found, tuple) and type(hf) in found)

    auto = [a for a in autos if gives(a)]
    assert auto, f"{folder}: no Auto class of {autos} gives {arch}"
    loads = [dict(cls=arch), dict(cls=auto[0])]
    base = tf.AutoModel._model_mapping[config_cls]
    if base is not type(hf):
        prefix = hf.base_model_prefix + "."
        heads = sorted({k.split(".")[0] + "." for k in hf.state_dict() if not k.startswith(prefix)})
        kwargs = {}  # build the base model as the head model builds its own (e.g. ViT's: no pooler)
        if "add_pooling_layer" in inspect.signature(base.__init__).parameters and (
            getattr(hf.base_model, "pooler", "?") is None
        ):
            kwargs["add_pooling_layer"] = False
        loads.append(dict(cls="AutoModel", kwargs=kwargs, allow_unexpected=heads))
    return loads


def backbone_cases(model: nn.Module, folder: Path, writer: CaseWriter) -> list[dict]:
    """A backbone's export: the HF-layout outputs are Tessera's own (see models/hf.py and tests/tf5_check.py):
    last_hidden_state = forward_features, pooler_output = forward_head(pre_logits=True), logits = model(x)."""
    to_hf(model, folder)
    loads = standard_loads(folder)
    size, chans = model.hparams()["img_size"], model.hparams()["in_chans"]
    other = [] if getattr(model, "fixed_input_size", False) else [(1, size + 4, size - 4)]
    cases, g = [], torch.Generator().manual_seed(3)
    for b, h, w in [(2, size, size), *other]:  # native size, and another one where the family allows
        x = torch.randn(b, chans, h, w, generator=g)
        ours = backbone_outputs(model, x)
        name = f"{writer.name(folder)}/{b}x{chans}x{h}x{w}"
        cases.append(
            writer.case(name, folder, {"pixel_values": x}, [dict(d) for d in loads], ours, same_names)
        )
    return cases


@torch.no_grad()
def backbone_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tessera's outputs under the HF field names they equal (see same_names). A DeiT (distill_token):
    DeiTModel's (identity) pooler reads the final cls token alone; DeiTForImageClassificationWithTeacher's
    cls_logits and distillation_logits are forward_head_distilled's."""
    feats = model.forward_features(x)
    out = {
        "last_hidden_state": feats,
        "pooler_output": model.forward_head(feats, pre_logits=True),
        "logits": model(x),
    }
    if type(model).__name__ == "CvT":  # tokens [cls, last map]: CvtModel returns the map and the cls apart
        out["last_hidden_state"] = model.forward_intermediates(x, [-1])[0]
        out["cls_token_value"] = feats[:, :1]
    if getattr(model, "dist_token", None) is not None:
        out["pooler_output"] = feats[:, 0]
        if model.hparams()["num_classes"]:
            out["cls_logits"], out["distillation_logits"] = model.forward_head_distilled(feats)
    return out


GRAY_DATA = "digits"  # a 1-channel dataset: the pipeline exports' data config
LABELS = [f"class {i}" for i in range(7)]


def pipeline_kwargs(task: str, labels: list[str] | None, extra: dict | None = None) -> dict:
    """A pipeline call's keyword arguments: every label scored (top_k; zero-shot: the candidate labels)."""
    kwargs = {}
    if labels:
        zero_shot = task == "zero-shot-image-classification"
        kwargs = {"candidate_labels": labels} if zero_shot else {"top_k": len(labels)}
    return {**kwargs, **(extra or {})}


def pipeline_cases(model: nn.Module, folder: Path, writer: CaseWriter) -> list[dict]:
    """A grayscale classifier exported for pipelines: the HF model on the gray input given as R = G = B equals
    Tessera's on the 1-channel input; transformers' image-classification pipeline on a gray PNG gives Tessera's
    probabilities (its eval transform, then the model) under the class names."""
    from pretrain.data.config import DataConfig

    size = model.hparams()["img_size"]
    to_hf(model, folder, data=DataConfig(dataset=GRAY_DATA, image_size=size), labels=LABELS)
    x = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(3))
    ours = backbone_outputs(model, x)
    rgb = {"pixel_values": x.expand(-1, 3, -1, -1).contiguous()}
    name = writer.name(folder)
    case = writer.case(name, folder, rgb, standard_loads(folder), ours, same_names)
    png = writer.gray_png(size, re.sub(r"[^A-Za-z0-9_.-]+", "_", name))
    with torch.no_grad():
        probs = model(tessera_pixels(png, size)).softmax(-1)[0]
    writer.pipeline(case, "image-classification", png, probs, LABELS)
    return [case]


def tessera_pixels(png: Path, size: int) -> torch.Tensor:
    """Tessera's eval transform of a PNG, read as GRAY_DATA's converter reads images: (1, C, size, size)."""
    from PIL import Image

    from pretrain.data.sources import get_dataset
    from pretrain.data.transforms import ImageTransform

    info = get_dataset(GRAY_DATA)
    with Image.open(png) as im:
        return ImageTransform(size, info.mean, info.std)(im.convert("L")).unsqueeze(0)


def same_names(hf: nn.Module) -> dict[str, str]:
    """A backbone's fields: HF output field -> the same name in `ours` (DeiT's classifier: its two logits
    too)."""
    fields = ["last_hidden_state", "pooler_output", "logits"]
    if isinstance(hf, tf.DeiTForImageClassificationWithTeacher):
        fields += ["cls_logits", "distillation_logits"]
    if isinstance(hf, tf.CvtModel):
        fields.append("cls_token_value")
    return {k: k for k in fields}


TEXT_SHAPES = ((2, 40), (1, 9))  # (B, N): longer than modernbert_test's 16-token local window, and shorter
# transformers' pipelines and AutoTokenizer on these (WordNet-like text; the tokenizer sentence has its <mask>)
TOKENIZER_TEXT = "The wolf (Canis lupus) is a <mask> carnivore; naïve café, 42 times!  Ends here.\n"
FILL_MASK_TEXT = "a domesticated carnivorous <mask> of the genus Canis"
PROMPT, NEW_TOKENS = "a domesticated carnivorous mammal", 8
MIN_LOGIT_GAP = (
    1e-3  # greedy generation: the best next token must lead the second by this (fp32 errors ~1e-6)
)


def text_names(hf: nn.Module) -> dict[str, str]:
    """A text model's fields: the LM's logits = Tessera's model(input_ids), the base model's last_hidden_state =
    forward_features(input_ids) (after the final norm)."""
    return {"logits": "logits", "last_hidden_state": "features"}


def text_cases(model: nn.Module, folder: Path, writer: CaseWriter) -> list[dict]:
    """A text run's export (to_hf with its data config: weights, tokenizer, special ids in the config): the LM
    class (LlamaForCausalLM / ModernBertForMaskedLM), its Auto class and the base model give Tessera's logits and
    features on random ids; the folder's AutoTokenizer is Tessera's tokenizer; transformers' text-generation
    (decoder) or fill-mask (encoder) pipeline gives what Tessera's model gives (text_pipeline_spec)."""
    from pretrain.data.tokenizer import ensure_tokenizer

    data = text_data()
    info = ensure_tokenizer(data)
    to_hf(model, folder, data=data)
    loads = standard_loads(folder, TEXT_AUTO_CLASSES)
    cases, g = [], torch.Generator().manual_seed(3)
    for b, n in TEXT_SHAPES:
        ids = torch.randint(0, model.vocab_size, (b, n), generator=g)
        with torch.no_grad():
            ours = {"logits": model(ids), "features": model.forward_features(ids)}
        name = f"{writer.name(folder)}/{b}x{n}"
        cases.append(
            writer.case(name, folder, {"input_ids": ids}, [dict(d) for d in loads], ours, text_names)
        )
    writer.tokenizer(cases[0], info, TOKENIZER_TEXT)
    spec, want, problems = text_pipeline_spec(model, info)
    writer.problems += [f"{cases[0]['name']}: {p}" for p in problems]
    writer.text_pipeline(cases[0], spec, want)
    return cases


@torch.no_grad()
def text_pipeline_spec(model: nn.Module, info) -> tuple[dict, torch.Tensor | None, list[str]]:
    """(manifest pipeline spec, expected scores or None, problems) of Tessera's model and tokenizer:
    fill-mask (encoder): the top-k token ids at the mask of FILL_MASK_TEXT, their strings and softmax scores;
    text-generation (decoder): PROMPT's ids and the greedy continuation (NEW_TOKENS, stopping after EOS), and
    the pipeline's text (the prompt, then the new tokens decoded without special tokens). A problem where the
    outcome is a near-tie that fp32 rounding could flip (then change the text)."""
    from pretrain.data.tokenizer import load_tokenizer

    tok, problems = load_tokenizer(info.path), []
    if not model.causal:
        ids = tok.encode(FILL_MASK_TEXT).ids
        probs = model(torch.tensor([ids]))[0, ids.index(info.mask_id)].softmax(-1)
        k = 5
        top = probs.topk(k + 1)
        gap = (top.values[:-1] - top.values[1:]).min().item()
        if gap <= ATOL:
            problems.append(
                f"fill-mask: the top-{k + 1} scores are {gap:.2g} apart, not > {ATOL:g}: ambiguous"
            )
        token_ids = top.indices[:k].tolist()
        spec = dict(
            task="fill-mask",
            text=FILL_MASK_TEXT,
            top_k=k,
            token_ids=token_ids,
            token_strs=[tok.decode([i], skip_special_tokens=False) for i in token_ids],
            expected="pipeline",
            atol=ATOL,
        )
        return spec, top.values[:k], problems
    prompt = tok.encode(PROMPT).ids
    seq = list(prompt)
    for _ in range(NEW_TOKENS):
        top2 = model(torch.tensor([seq]))[0, -1].topk(2)
        if (top2.values[0] - top2.values[1]).item() <= MIN_LOGIT_GAP:
            problems.append(f"text-generation: step {len(seq) - len(prompt)}'s top-2 logits are a near tie")
        seq.append(int(top2.indices[0]))
        if seq[-1] == info.eos_id:
            break
    spec = dict(
        task="text-generation",
        text=PROMPT,
        kwargs=dict(max_new_tokens=NEW_TOKENS, do_sample=False),
        token_ids=seq,
        generated_text=PROMPT + tok.decode(seq[len(prompt) :], skip_special_tokens=True),
    )
    return spec, None, problems


ZERO_SHOT_LABELS = ["grinning face", "red heart", "thumbs up", "cat face"]
ZERO_SHOT_TEMPLATE = "This is a photo of {}."  # the pipeline's default hypothesis_template
CAPTION = "Grinning Face With Smiling Eyes: naïve café"


def two_tower_cases(model: nn.Module, folder: Path, writer: CaseWriter) -> list[dict]:
    """An image-text run's export (model + processor, `to_hf(..., data=image_text_data())`): the target class and
    AutoModel give Tessera's normalized image_embeds, text_embeds and logits_per_image on random images and padded
    captions (SigLIP without attention_mask, as its processor gives none); the image processor, and the tokenizer
    on a caption (ids: Tessera's data layer, [BOS] ids EOS; the decoding 4.57's export gives); CLIP and SigLIP
    also transformers' zero-shot pipeline, scored by Tessera's model (CLIP: softmax; SigLIP: sigmoid)."""
    from types import SimpleNamespace

    from models.two_tower_hf import hf_embeddings, hf_target, tessera_embeddings
    from pretrain.data.image_text import caption_ids, tokenize_captions
    from pretrain.data.tokenizer import tokenizer_info

    size, text_len = model.img_size, model.context_length
    data = image_text_data(size, text_len)
    info = tokenizer_info(data)
    to_hf(model, folder, data=data)
    target = hf_target(model)
    g = torch.Generator().manual_seed(3)
    texts = [
        "a photo of a cat",
        "grinning face",
        "face with tears of joy, " * 5,
    ]  # the last is cut to text_len
    ids, mask, _ = tokenize_captions(texts, info, text_len)
    x = torch.randn(2, 3, size, size, generator=g)
    siglip = target == "SiglipModel"
    ours = tessera_embeddings(model, x, ids, mask)
    inputs = {"pixel_values": x, "input_ids": ids, **({} if siglip else {"attention_mask": mask})}

    def fields(hf: nn.Module) -> dict[str, str]:
        return {k: k for k in ours}

    forward_457 = None
    if (
        target == "VisionTextDualEncoderModel"
    ):  # 4.57 passes token_type_ids to CLIPTextModel (models/two_tower_hf)
        forward_457 = lambda hf, kw: SimpleNamespace(  # noqa: E731
            **hf_embeddings(hf, kw["pixel_values"], kw["input_ids"], kw.get("attention_mask"))
        )
    case = writer.case(writer.name(folder), folder, inputs, standard_loads(folder), ours, fields, forward_457)
    caption = caption_ids([CAPTION], info)[0]
    case["tokenizer"] = dict(
        text=CAPTION,
        ids=caption,
        decoded=tf.AutoTokenizer.from_pretrained(folder).decode(caption),
        special_ids={"bos": info.bos_id, "eos": info.eos_id, "pad": info.padding_id},
    )
    got = tf.AutoTokenizer.from_pretrained(folder)(CAPTION)["input_ids"]
    if got != caption:
        writer.problems.append(f"{case['name']}: 4.57 AutoTokenizer ids {got} != Tessera's {caption}")
    if target == "VisionTextDualEncoderModel":  # no zero-shot pipeline for it
        return [case]
    from PIL import Image

    from pretrain.data.transforms import ImageTransform

    png = writer.root / "tensors" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', case['name'])}.rgb.png"
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(pixels, "RGB").save(png)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    with Image.open(png) as im:
        image = ImageTransform(size, tuple(pre["image_mean"]), tuple(pre["image_std"]))(im).unsqueeze(0)
    prompts = [ZERO_SHOT_TEMPLATE.format(label) for label in ZERO_SHOT_LABELS]
    p_ids, p_mask, _ = tokenize_captions(prompts, info, text_len)
    logits = tessera_embeddings(model, image, p_ids, p_mask)["logits_per_image"][0]
    want = logits.sigmoid() if siglip else logits.softmax(-1)
    writer.pipeline(case, "zero-shot-image-classification", png, want, ZERO_SHOT_LABELS)
    return [case]


def mae_cases(mae: nn.Module, folder: Path, writer: CaseWriter) -> list[dict]:
    """MAE export: ViTMAEForPreTraining with the same noise gives Tessera's pred (logits), loss, mask; its base
    ViTMAEModel the encoder on the kept tokens; ViTModel (no pooler) from the same folder, and the encoder/
    folder, the encoder's features (and, for encoder/, its pooled cls token through the identity pooler)."""
    pipeline = folder.name == "pipeline"  # exported as the CLI does: processors, encoder/ taking RGB
    if pipeline:
        from pretrain.data.config import DataConfig

        to_hf(mae, folder, data=DataConfig(dataset=GRAY_DATA, image_size=16))
    else:
        to_hf(mae, folder)
    vit = mae.backbone
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, vit.in_chans, 16, 16, generator=g)
    noise = torch.rand(3, vit.num_patches, generator=g)
    with torch.no_grad():
        out = mae({"image": x}, noise=noise)
        ids_keep, mask, ids_restore = random_masking(noise, mae.cfg.mask_ratio)
        feats = vit.forward_features(x)
        ours = {
            "pred": out["pred"],
            "loss": out["loss"],
            "mask": out["mask"],
            "ids_restore": ids_restore,
            "latent": vit.forward_features(x, ids_keep=ids_keep),
            "features": feats,
            "pooled": vit.forward_head(feats, pre_logits=True),
        }

    def fields(hf: nn.Module) -> dict[str, str]:
        if isinstance(hf, tf.ViTMAEForPreTraining):
            return {"logits": "pred", "loss": "loss", "mask": "mask", "ids_restore": "ids_restore"}
        if isinstance(hf, tf.ViTMAEModel):
            return {"last_hidden_state": "latent", "mask": "mask", "ids_restore": "ids_restore"}
        return {"last_hidden_state": "features", "pooler_output": "pooled"}  # ViTModel

    as_vit = dict(cls="ViTModel", kwargs={"add_pooling_layer": False}, allow_unexpected=["decoder."])
    inputs = {"pixel_values": x, "noise": noise}
    # the encoder folder of a pipeline export takes RGB: the gray input as R = G = B
    enc_inputs = {**inputs, "pixel_values": x.expand(-1, 3, -1, -1).contiguous()} if pipeline else inputs
    cases = [
        writer.case(writer.name(folder), folder, inputs, [*standard_loads(folder), as_vit], ours, fields),
        writer.case(
            writer.name(folder / "encoder"),
            folder / "encoder",
            enc_inputs,
            standard_loads(folder / "encoder"),
            ours,
            fields,
        ),
    ]
    if pipeline:  # feature extraction on a gray PNG: Tessera's encoder features of its eval transform
        png = writer.gray_png(16, "mae_pipeline")
        with torch.no_grad():
            feats = vit.forward_features(tessera_pixels(png, 16))
        writer.pipeline(cases[1], "image-feature-extraction", png, feats, None)
    return cases


def simmim_cases(obj: nn.Module, folder: Path, writer: CaseWriter) -> list[dict]:
    """SimMIM export: XForMaskedImageModeling (and AutoModelForMaskedImageModeling) with bool_masked_pos = the stem
    mask flattened gives Tessera's reconstruction and loss; its base model, built with use_mask_token=True, the
    masked features; OUT/encoder (the plain XModel, no mask token) the features and pooled output unmasked. The
    pipeline variant (grayscale data) also runs image-feature-extraction on encoder/, which takes RGB."""
    pipeline = folder.name == "pipeline"
    size, backbone = obj.image_size, obj.backbone
    if pipeline:
        from pretrain.data.config import DataConfig

        to_hf(obj, folder, data=DataConfig(dataset=GRAY_DATA, image_size=size))
    else:
        to_hf(obj, folder)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, obj.in_chans, size, size, generator=g)
    mask = obj.draw_mask({"index": torch.tensor([3, 11]), "epoch": torch.tensor([0, 1])})  # (2, h, w)
    with torch.no_grad():
        out = obj({"image": x}, mask=mask)
        feats = backbone.forward_features(x)
        ours = {
            "reconstruction": out["pred"],
            "loss": out["loss"],
            "masked_features": backbone.forward_features(x, mask=mask),
            "features": feats,
            "pooled": backbone.forward_head(feats, pre_logits=True),
        }

    def fields(hf: nn.Module) -> dict[str, str]:
        if "MaskedImageModeling" in type(hf).__name__:
            return {"reconstruction": "reconstruction", "loss": "loss"}
        if getattr(hf.embeddings, "mask_token", None) is not None:  # the base model of the MIM folder
            return {"last_hidden_state": "masked_features"}
        return {"last_hidden_state": "features", "pooler_output": "pooled"}  # encoder/

    loads = standard_loads(folder, ("AutoModelForMaskedImageModeling",))
    for load in loads:
        if load["cls"] == "AutoModel":  # the base model keeps the mask token (its default drops it)
            load["kwargs"] = {**load.get("kwargs", {}), "use_mask_token": True}
    assert [ld["cls"] for ld in loads][1:] == ["AutoModelForMaskedImageModeling", "AutoModel"], loads
    inputs = {"pixel_values": x, "bool_masked_pos": mask.flatten(1)}
    # the encoder folder of a pipeline export takes RGB: the gray input as R = G = B
    enc_x = x.expand(-1, 3, -1, -1).contiguous() if pipeline else x
    cases = [
        writer.case(writer.name(folder), folder, inputs, loads, ours, fields),
        writer.case(
            writer.name(folder / "encoder"),
            folder / "encoder",
            {"pixel_values": enc_x},
            standard_loads(folder / "encoder"),
            ours,
            fields,
        ),
    ]
    if pipeline:  # feature extraction on a gray PNG: Tessera's encoder features of its eval transform
        png = writer.gray_png(size, "simmim_pipeline")
        with torch.no_grad():
            want = backbone.forward_features(tessera_pixels(png, size))
        writer.pipeline(cases[1], "image-feature-extraction", png, want, None)
    return cases


def write_manifest(root: Path, targets: list[ExportTarget]) -> tuple[Path, list[str]]:
    """Export every target under root, write the manifest; -> (its path, the 4.57 cross-check problems)."""
    writer, cases = CaseWriter(root), []
    for t in targets:
        folder = root / "exports" / t.name  # its cases are named by the folder under exports/
        cases += t.cases(t.build(), folder, writer)
    assert len({c["name"] for c in cases}) == len(cases), "duplicate case names"
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"atol": ATOL, "cases": cases}, indent=1))
    return manifest, writer.problems


# ---- tests ---------------------------------------------------------------------------------------------------

VENV_PY = ROOT / ".venv-tf5" / "bin" / "python"
CHECK = ROOT / "tests" / "tf5_check.py"
CONSTRAINTS = ROOT / "requirements" / "constraints-tf5.txt"
CHECK_MAY_IMPORT = {"__future__", "json", "os", "sys", "traceback", "pathlib"} | {
    "torch",
    "transformers",
    "PIL",
    "safetensors",  # fmt: skip
}


def run_check(manifest: Path, python: Path | str, timeout: int = 900) -> subprocess.CompletedProcess:
    """tests/tf5_check.py under `python` -I (isolated: nothing from this checkout on sys.path), offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [str(python), "-I", str(CHECK), str(manifest)],
        cwd=manifest.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def norm(name: str) -> str:
    """A distribution name as pip compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {norm(a): b.split("+")[0] for a, _, b in (line.partition("==") for line in lines if "==" in line)}


def pins_from_freeze(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            out[norm(name)] = version.split("+")[0]
        elif line.strip():  # an editable or direct-URL install (e.g. Tessera itself): never in a user's venv
            out[line.strip()] = "?"
    return out


def test_every_export_target_is_enumerated():
    """A new adapter family cannot be left out: each has a `*_test*` model, an image family's exported headless
    and with a head (and for pipelines), a text family's in each of its variants, with the tokenizer."""
    targets = export_targets()
    assert {"vit", "swin", "swinv2", "convnext", "convnextv2", "pvt_v2", "poolformer"} <= set(
        image_families()
    )
    assert {"llama", "modernbert"} <= set(text_families())
    assert len({t.name for t in targets}) == len(targets)
    for family in HF_ADAPTERS.names():
        assert family_test_models(family), f"family {family!r} has no *_test* model to export"
        names = {t.name for t in targets if t.family == family}
        for model in family_test_models(family):
            if family in text_families():
                want = {f"{family}/{model}/{v}" for v in TEXT_VARIANTS.get(family, {"text": {}})}
                assert want <= names, family
                assert {t.cases for t in targets if t.family == family} == {text_cases}, family
            else:
                assert {f"{family}/{model}/classes={n}" for n in (0, 7)} <= names, family
    assert {t.family for t in targets} == {*HF_ADAPTERS.names(), "mae", "simmim", "two_tower"}
    # image-text: every target of models/two_tower_hf.py, the dual encoder with each of its image tower families
    from models.two_tower_hf import DUAL_IMAGE_TOWERS, TARGETS, hf_target

    two = [t.build() for t in targets if t.family == "two_tower"]
    assert {hf_target(m) for m in two} == set(TARGETS)
    dual = {type(m.visual) for m in two if hf_target(m) == "VisionTextDualEncoderModel"}
    assert dual == set(DUAL_IMAGE_TOWERS)
    assert {t.family for t in targets if t.name.endswith("/pipeline")} == {*image_families(), "mae", "simmim"}
    # SimMIM: every family with a transformers MIM class (ViT, Swin, Swin V2)
    mim = {MODELS.get(t.name.split("/")[1]).builds for t in targets if t.family == "simmim"}
    assert mim == set(MIM_TO_HF)
    assert {"vit_test_patch4", "swin_test", "swinv2_test"} <= set(simmim_test_models())
    assert {"llama/llama_test/untied", "llama/llama_test/tied", "modernbert/modernbert_test/mlm"} <= {
        t.name for t in targets
    }
    llama = {t.name: t.build() for t in targets if t.family == "llama"}
    assert (
        llama["llama/llama_test/tied"].tie_embeddings and not llama["llama/llama_test/untied"].tie_embeddings
    )
    assert all(m.num_kv_heads < m.num_heads for m in llama.values())  # GQA


def test_check_script_imports_nothing_from_the_repo():
    tree = ast.parse(CHECK.read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= CHECK_MAY_IMPORT, mods - CHECK_MAY_IMPORT


@pytest.mark.slow  # ~20 s: an export, and a subprocess importing transformers
def test_check_script_fails_on_a_wrong_output_or_key(tmp_path):
    """The checker itself (run here under transformers 4.57, no .venv-tf5 needed): passes a true manifest, and
    fails, naming them, on a perturbed expected tensor and on a base-model load whose dropped head keys are not
    allowed."""
    (target,) = [t for t in export_targets() if t.name == "vit/vit_test_patch4/classes=7"]
    manifest, problems = write_manifest(tmp_path, [target])
    assert problems == []
    ok = run_check(manifest, sys.executable, timeout=300)
    assert ok.returncode == 0 and "PASS vit/" in ok.stdout, ok.stdout + ok.stderr[-3000:]

    from safetensors.torch import load_file, save_file

    data = json.loads(manifest.read_text())
    case = data["cases"][0]
    expected = load_file(case["expected"])
    expected["logits"][0, 0] += 1e-3
    save_file(expected, case["expected"])
    base = [ld for ld in case["loads"] if ld["allow_unexpected"]]
    assert base and base[0]["allow_unexpected"] == ["classifier."]
    base[0]["allow_unexpected"] = []
    manifest.write_text(json.dumps(data))
    bad = run_check(manifest, sys.executable, timeout=300)
    assert bad.returncode == 1, bad.stdout + bad.stderr[-3000:]
    assert "FAIL vit/" in bad.stdout
    assert "logits: max abs error 0.001" in bad.stdout and "unexpected_keys (2)" in bad.stdout, bad.stdout


@pytest.mark.slow  # ~40 s: two text exports, and two subprocesses importing transformers
def test_check_script_fails_on_wrong_text_outputs(tmp_path):
    """The checker's text parts (under transformers 4.57, as above): a true manifest of a Llama and a ModernBERT
    export passes; wrong tokenizer ids, a wrong greedy continuation, a wrong fill-mask score and a folder whose
    tokenizer no case checks each fail, named."""
    names = ("llama/llama_test/untied", "modernbert/modernbert_test/mlm")
    manifest, problems = write_manifest(tmp_path, [t for t in export_targets() if t.name in names])
    assert problems == []
    ok = run_check(manifest, sys.executable, timeout=300)
    assert ok.returncode == 0 and ok.stdout.count("\nPASS ") == 4, ok.stdout + ok.stderr[-3000:]

    from safetensors.torch import load_file, save_file

    data = json.loads(manifest.read_text())
    llama, _, bert, _ = data["cases"]
    assert llama["pipeline"]["task"] == "text-generation" and bert["pipeline"]["task"] == "fill-mask"
    llama["tokenizer"]["ids"][0] += 1
    llama["pipeline"]["token_ids"][-1] += 1
    expected = load_file(bert["expected"])
    expected["pipeline"][0] += 1e-3
    save_file(expected, bert["expected"])
    del bert["tokenizer"]
    manifest.write_text(json.dumps(data))
    bad = run_check(manifest, sys.executable, timeout=300)
    assert bad.returncode == 1, bad.stdout + bad.stderr[-3000:]
    assert f"FAIL {llama['name']}" in bad.stdout and f"FAIL {bert['name']}" in bad.stdout, bad.stdout
    assert "AutoTokenizer (PreTrainedTokenizerFast): ids" in bad.stdout, bad.stdout
    assert "pipeline('text-generation'): token_ids" in bad.stdout, bad.stdout
    assert "pipeline('fill-mask'): scores: max abs error 0.001" in bad.stdout, bad.stdout
    assert f"tokenizer.json, no tokenizer: ['{bert['folder']}']" in bad.stdout, bad.stdout


@pytest.mark.slow
def test_exports_load_in_transformers5_with_tesseras_outputs(tmp_path):
    t0 = time.monotonic()
    venv = subprocess.run(
        ["bash", "scripts/tf5-venv.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    assert venv.returncode == 0, f"scripts/tf5-venv.sh failed:\n{venv.stdout[-4000:]}\n{venv.stderr[-6000:]}"
    t_venv = time.monotonic() - t0
    # the venv holds exactly the pinned set (so the constraints file is complete), and no Tessera
    freeze = subprocess.run(
        [str(VENV_PY), "-m", "pip", "freeze", "--all", "--exclude", "pip", "--exclude", "setuptools"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = pins_from_freeze(freeze.stdout)
    assert installed == pins(CONSTRAINTS), f"installed {installed} != pinned {pins(CONSTRAINTS)}"

    manifest, problems = write_manifest(tmp_path, export_targets())
    t_export = time.monotonic() - t0 - t_venv
    res = run_check(manifest, VENV_PY)
    t_check = time.monotonic() - t0 - t_venv - t_export
    print(res.stdout)
    print(
        f"[timing] venv {t_venv:.0f} s, export + 4.57 cross-check {t_export:.0f} s, transformers 5 check {t_check:.0f} s"
    )
    header = res.stdout.splitlines()[0] if res.stdout else ""
    assert header.startswith(f"transformers {pins(CONSTRAINTS)['transformers']} "), (
        res.stdout + res.stderr[-6000:]
    )
    assert problems == [], "cross-check against transformers 4.57 in Tessera's venv failed:\n" + "\n".join(
        problems
    )
    assert res.returncode == 0, (
        f"transformers 5 check failed:\n{res.stdout}\n--- stderr\n{res.stderr[-6000:]}"
    )
    n = len(json.loads(manifest.read_text())["cases"])
    assert f"{n}/{n} cases passed" in res.stdout and res.stdout.count("\nPASS ") == n
