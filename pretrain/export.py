"""Export to Hugging Face format, and import back.

    python -m pretrain.export RUN_DIR_OR_CHECKPOINT OUT_DIR

consolidates the checkpoint (any engine, any ZeRO stage) and writes OUT_DIR loadable offline by transformers:
an MAE run gives `ViTMAEForPreTraining.from_pretrained(OUT_DIR)`, plus OUT_DIR/encoder for `ViTModel`; a SimMIM run
on ViT / Swin / Swin V2 gives `ViTForMaskedImageModeling` / `SwinForMaskedImageModeling` /
`Swinv2ForMaskedImageModeling` (image_size = the training size, encoder_stride = the final stride), plus
OUT_DIR/encoder for the plain `ViTModel` / `SwinModel` / `Swinv2Model` (no mask token); a SimMIM run on another
family, its encoder alone (no transformers MIM class holds it); any other run exports its backbone through the
family's adapter (models/hf.py): `SwinModel`, `ConvNextModel`, ... or
`<Family>ForImageClassification` when the backbone has a classifier head (a ViT with DeiT's distillation
token: `DeiTModel` / `DeiTForImageClassificationWithTeacher`; a SimMIM run on one, its encoder alone); text
runs `LlamaForCausalLM` (decoder) or `ModernBertForMaskedLM` (encoder) with the run's tokenizer (`AutoTokenizer`);
image-text (two-tower) runs `CLIPModel`, `SiglipModel` or `VisionTextDualEncoderModel` (models/two_tower_hf.py
picks the one that holds the towers exactly, or says why none does) with their processor (`AutoProcessor`:
image processor + the run's tokenizer), so `pipeline("zero-shot-image-classification")` works on CLIP and
SigLIP exports. The key maps live next to the models.
Every folder also gets the run's image processor (`preprocessor_config.json`), classifiers their class names, and
OUT_DIR a model card (README.md) and tessera.json (pretrain/hf_files.py): `pipeline(...)` works on it offline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from models.hf import (
    GRAY_FROM_RGB,
    GRAY_FROM_RGB_KEY,
    adapter_for_arch,
    adapter_for_model,
    gray_from_rgb,
    load_strict,
    rgb_from_gray,
)
from models.swin import SwinTransformer
from models.swin_hf import swin_mim_from_hf, swin_mim_to_hf
from models.swin_v2 import SwinTransformerV2
from models.swin_v2_hf import swinv2_mim_from_hf, swinv2_mim_to_hf
from models.two_tower_hf import hf_target, is_two_tower_config, two_tower_from_hf, two_tower_to_hf
from models.vit import VisionTransformer
from models.vit_hf import (
    decoder_from_hf,
    decoder_kwargs_from_hf,
    mae_to_hf,
    vit_from_hf,
    vit_mim_from_hf,
    vit_mim_to_hf,
    vit_to_hf,
)
from pretrain.build import from_dict
from pretrain.checkpoint import find_latest, read_meta
from pretrain.data.config import DataConfig
from pretrain.errors import ConfigError
from pretrain.hf_files import (
    Preprocess,
    class_names,
    final_loss,
    image_text_model_card,
    model_card,
    set_labels,
    text_model_card,
    write_image_processor,
    write_image_text_processor,
)
from pretrain.objectives.mae import MAE, MAEConfig
from pretrain.objectives.simmim import SimMIM, SimMIMConfig

# SimMIM: the backbones transformers has a *ForMaskedImageModeling for, (backbone, decoder, encoder_stride) -> it
MIM_TO_HF = {
    VisionTransformer: vit_mim_to_hf,
    SwinTransformer: swin_mim_to_hf,
    SwinTransformerV2: swinv2_mim_to_hf,
}
# ... and back: architecture -> (state dict, config) -> (backbone with its mask token, decoder state dict)
MIM_FROM_HF = {
    "ViTForMaskedImageModeling": vit_mim_from_hf,
    "SwinForMaskedImageModeling": swin_mim_from_hf,
    "Swinv2ForMaskedImageModeling": swinv2_mim_from_hf,
}
SIMMIM_KEY = "tessera_simmim"  # config.json entry: the run's SimMIMConfig (mask_ratio, mask_patch_size)


def mim_exporter(backbone: nn.Module):
    """MIM_TO_HF's exporter of a SimMIM run's backbone, or None: no transformers class computes its SimMIM
    (the run's encoder is exported alone). A DeiT (ViT with a distillation token): DeiTForMaskedImageModeling
    decodes tokens [1:-1] (the distillation token and all patches but the last) where SimMIM decodes the
    patches."""
    if getattr(backbone, "dist_token", None) is not None:
        return None
    return MIM_TO_HF.get(type(backbone))


def to_hf(
    model: nn.Module, out_dir: str | Path, data: DataConfig | None = None, labels: list[str] | None = None
) -> nn.Module | None:
    """Write the HF folder for a Tessera model (an MAE objective, another objective's backbone, or a bare
    backbone); return the HF model. With the run's `data` config, the folder also gets the image processor that
    repeats its eval preprocessing (text: the run's tokenizer); `labels` name a classifier's outputs (config
    id2label). A text model no transformers class can hold (linear attention, a sliding window) is written in
    Tessera's safetensors layout instead, and None returned (`_tessera_layout`)."""
    out = Path(out_dir)
    backbone = getattr(model, "backbone", model)  # objectives hold theirs as .backbone
    if getattr(backbone, "modality", "image") == "text":
        return _text_to_hf(backbone, out, data)
    if getattr(backbone, "modality", "image") == "image_text":
        return _two_tower_to_hf(backbone, out, data)
    pre = None if data is None else Preprocess.from_data(data)

    def for_pipelines(net: nn.Module) -> tuple[nn.Module, Preprocess | None]:
        """Pipelines feed RGB: a grayscale run's backbone takes 3 channels (models.hf.rgb_from_gray)."""
        if pre is None:
            return net, pre
        piped = pre.for_pipelines()
        return (rgb_from_gray(net) if piped.gray_from_rgb else net), piped

    if isinstance(model, MAE):  # the pretraining model keeps its channels; the encoder is for pipelines
        hf = mae_to_hf(model.backbone, model.decoder, model.cfg.mask_ratio, model.cfg.norm_pix_loss)
        encoder, enc_pre = for_pipelines(backbone)
        folders = {out: (hf, pre), out / "encoder": (vit_to_hf(encoder), enc_pre)}
    elif isinstance(model, SimMIM):  # likewise; the encoder without its mask token (a plain XModel)
        encoder, enc_pre = for_pipelines(without_mask_token(backbone))
        enc_hf = adapter_for_model(encoder).to_hf(encoder)
        mim = mim_exporter(backbone)
        if mim is None:  # no transformers MIM class for this family: the encoder alone
            hf, folders = enc_hf, {out: (enc_hf, enc_pre)}
        else:
            hf = mim(backbone, model.decoder, model.stride)
            setattr(hf.config, SIMMIM_KEY, dataclasses.asdict(model.cfg))  # from_hf rebuilds the objective
            folders = {out: (hf, pre), out / "encoder": (enc_hf, enc_pre)}
    else:
        net, net_pre = for_pipelines(backbone)
        hf = adapter_for_model(net).to_hf(net)
        folders = {out: (hf, net_pre)}
    for folder, (hf_model, folder_pre) in folders.items():
        set_labels(hf_model, labels)
        if folder_pre is not None and folder_pre.gray_from_rgb:
            setattr(hf_model.config, GRAY_FROM_RGB_KEY, list(GRAY_FROM_RGB))  # from_hf folds it back
        hf_model.save_pretrained(folder, safe_serialization=True)
        if folder_pre is not None:
            write_image_processor(folder, folder_pre)
    return hf


def without_mask_token(backbone: nn.Module) -> nn.Module:
    """The backbone as built without a mask token (its other weights shared by value): what a plain XModel holds.
    Unchanged when it has none."""
    h = backbone.hparams()
    if not h.get("mask_token"):
        return backbone
    plain = type(backbone)(**{**h, "mask_token": False})
    sd = {k: v for k, v in backbone.state_dict().items() if k != "mask_token"}
    return load_strict(plain, sd, f"{type(backbone).__name__} without its mask token")


def _simmim_from_hf(hf_dir: Path, arch: str, sd: dict, config) -> SimMIM:
    """A *ForMaskedImageModeling folder -> the SimMIM objective (backbone with its mask token, decoder). The
    mask settings are the run's (config.json's tessera_simmim); a folder from elsewhere gets SimMIMConfig's
    defaults, or mask cells of one patch where those do not fit its image."""
    backbone, dec = MIM_FROM_HF[arch](sd, config)
    saved = getattr(config, SIMMIM_KEY, None)
    try:
        model = SimMIM(backbone, SimMIMConfig(**(saved or {})))
    except ConfigError:
        if saved is not None:
            raise
        model = SimMIM(backbone, SimMIMConfig(mask_patch_size=backbone.stem_stride))
    if config.encoder_stride != model.stride:
        raise ValueError(
            f"{hf_dir}: encoder_stride {config.encoder_stride} is not the encoder's final stride {model.stride}"
        )
    model.decoder.load_state_dict(dec, strict=True)
    return model.eval()


def _text_to_hf(backbone: nn.Module, out: Path, data: DataConfig | None) -> nn.Module:
    """A text backbone as its HF twin (LlamaForCausalLM, ModernBertForMaskedLM), with the run's tokenizer
    (AutoTokenizer) and its special token ids in the config, so pipeline("text-generation" / "fill-mask") works."""
    try:
        hf = adapter_for_model(backbone).to_hf(backbone)
    except ValueError as why:  # e.g. linear attention: no transformers class holds it at these pins
        return _tessera_layout(backbone, out, data, str(why))
    tokenizer = None
    if data is not None:
        from pretrain.data.tokenizer import hf_tokenizer, tokenizer_info

        info = tokenizer_info(data)
        tokenizer = hf_tokenizer(info)
        for name in ("bos", "eos", "pad"):
            value = getattr(info, f"{name}_id", None)
            if value is not None and hasattr(hf.config, f"{name}_token_id"):
                setattr(hf.config, f"{name}_token_id", int(value))
                if getattr(hf, "generation_config", None) is not None:
                    setattr(hf.generation_config, f"{name}_token_id", int(value))
    hf.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return hf


def _two_tower_to_hf(model: nn.Module, out: Path, data: DataConfig | None) -> nn.Module:
    """A two-tower model as CLIPModel / SiglipModel / VisionTextDualEncoderModel (ValueError naming what none
    holds), with the run's processor (image processor + tokenizer) when `data` is given."""
    info = None
    if data is not None:
        from pretrain.data.tokenizer import tokenizer_info

        info = tokenizer_info(data)
        if info is None:
            raise ValueError(
                f"data.dataset {data.dataset!r} has no tokenizer: not the data of an image-text run"
            )
        _check_tokenizer_fits(model, info)
    ids = None
    if info is not None:  # the config's special ids (those the model does not fix itself)
        ids = dict(bos_token_id=info.bos_id, eos_token_id=info.eos_id, pad_token_id=info.padding_id)
    hf = two_tower_to_hf(model, tokenizer_ids=ids)
    hf.save_pretrained(out, safe_serialization=True)
    if data is not None:
        write_image_text_processor(out, hf_target(model), Preprocess.from_data(data), info, data.text_len)
    return hf


def _check_tokenizer_fits(model: nn.Module, info) -> None:
    """The run's tokenizer is the one the model was built for: ids within its vocabulary, the same EOS (where CLIP
    pools) and padding id."""
    problems = []
    if info.vocab_size > model.vocab_size:
        problems.append(f"vocabulary {info.vocab_size} > the model's vocab_size {model.vocab_size}")
    if model.eos_token_id is not None and info.eos_id != model.eos_token_id:
        problems.append(f"EOS id {info.eos_id} != the model's eos_token_id {model.eos_token_id}")
    if model.pad_token_id is not None and info.padding_id != model.pad_token_id:
        problems.append(f"padding id {info.padding_id} != the model's pad_token_id {model.pad_token_id}")
    if problems:
        raise ValueError(f"data.tokenizer {info.path} does not fit the model: {'; '.join(problems)}")


TESSERA_LAYOUT = "tessera_model.json"


def _tessera_layout(backbone: nn.Module, out: Path, data: DataConfig | None, why: str) -> None:
    """A model transformers has no class for, in Tessera's own safetensors layout: `model.safetensors` (the
    backbone's state dict, keys as in its models/<family>.py), `tessera_model.json` (its class and constructor
    arguments) and the run's tokenizer files; `from_hf(out)` builds it back. Returns None (no HF model)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in backbone.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "layout": "tessera"})
    cls = type(backbone)
    spec = {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "hparams": backbone.hparams(),
        "no_hf_export": why,
    }
    (out / TESSERA_LAYOUT).write_text(json.dumps(spec, indent=1))
    if data is not None:
        from pretrain.data.tokenizer import hf_tokenizer, tokenizer_info

        hf_tokenizer(tokenizer_info(data)).save_pretrained(out)
    return None


def _from_tessera_layout(folder: Path) -> nn.Module:
    import importlib

    from safetensors.torch import load_file

    spec = json.loads((folder / TESSERA_LAYOUT).read_text())
    module, _, name = spec["class"].rpartition(".")
    if not module.startswith("models."):
        raise ValueError(f"{folder / TESSERA_LAYOUT}: class {spec['class']!r} is not a Tessera model")
    model = getattr(importlib.import_module(module), name)(**spec["hparams"])
    return load_strict(model, load_file(str(folder / "model.safetensors")), f"{folder} ({spec['class']})")


def from_hf(hf_dir: str | Path) -> nn.Module:
    """Build the Tessera model from an HF folder written by `to_hf`, or any folder of a supported architecture
    (ViTMAE, {ViT,Swin,Swinv2}ForMaskedImageModeling (-> the SimMIM objective), CLIPModel / SiglipModel /
    VisionTextDualEncoderModel (-> the two-tower model), or one a family adapter imports: ViT, Swin, ConvNeXt,
    ...)."""
    from safetensors.torch import load_file

    from ops.compat import import_transformers

    hf_dir = Path(hf_dir)
    if (
        hf_dir / TESSERA_LAYOUT
    ).is_file():  # a model with no transformers class (pretrain.export._tessera_layout)
        return _from_tessera_layout(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json: not a Hugging Face model folder")
    config = import_transformers().AutoConfig.from_pretrained(str(hf_dir))
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir} has no *.safetensors weights")
    sd = {k: v for f in files for k, v in load_file(str(f)).items()}
    arch = (config.architectures or [""])[0]
    if is_two_tower_config(config):  # CLIPModel, SiglipModel, VisionTextDualEncoderModel
        return two_tower_from_hf(sd, config)
    if arch in MIM_FROM_HF:
        return _simmim_from_hf(hf_dir, arch, sd, config)
    if arch == "ViTMAEForPreTraining":
        if not config.qkv_bias:  # transformers applies it to the decoder too
            raise ValueError(f"{hf_dir}: ViTMAEConfig.qkv_bias=False: Tessera's MAE decoder has qkv biases")
        dec = decoder_kwargs_from_hf(config)
        cfg = MAEConfig(
            mask_ratio=config.mask_ratio,
            norm_pix_loss=config.norm_pix_loss,
            decoder_dim=dec["dim"],
            decoder_depth=dec["depth"],
            decoder_heads=dec["num_heads"],
            decoder_mlp_ratio=dec["mlp_ratio"],
        )
        model = MAE(vit_from_hf(sd, config), cfg)
        decoder_from_hf(model.decoder, sd)
        return model.eval()
    try:
        adapter = adapter_for_arch(arch)
    except ValueError as e:
        raise ValueError(f"{hf_dir}: {e}") from e
    model = adapter.from_hf(sd, config).eval()
    if getattr(config, GRAY_FROM_RGB_KEY, None):  # exported from a grayscale run: give its 1 channel back
        model = gray_from_rgb(model)
    return model


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the latest complete one of a run directory."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = find_latest(root) if root.is_dir() else None
        if found is not None:
            return found
    raise FileNotFoundError(f"{path} is neither a checkpoint nor a run directory with a complete checkpoint")


def load_checkpoint_model(path: str | Path, with_config: bool = False):
    """(model with consolidated fp32 weights, meta) from a run directory or checkpoint folder; with
    `with_config`, (model, meta, the run's Config)."""
    from pretrain.build import build_model
    from pretrain.engine import consolidated_state_dict

    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    cfg = from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
    from pretrain.objectives.distill import without_teacher

    with without_teacher():  # a distilled student is rebuilt without its teacher or store (they may be gone)
        model = build_model(cfg)
    state = consolidated_state_dict(str(folder / "engine"), meta["engine"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{folder}: checkpoint does not match its config (missing {missing}, unexpected {unexpected})"
        )
    meta = {**meta, "checkpoint": str(folder), "data": dataclasses.asdict(cfg.data)}
    return (model.float().eval(), meta, cfg) if with_config else (model.float().eval(), meta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.export", description="Export a checkpoint to HF format"
    )
    p.add_argument("checkpoint", help="run directory (its latest checkpoint) or a checkpoint folder")
    p.add_argument("out_dir")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already holds files")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            print(
                f"error: {out} is not empty (stale weights would mix in); pass --overwrite", file=sys.stderr
            )
            return 2
        shutil.rmtree(out)
    try:
        model, meta, cfg = load_checkpoint_model(args.checkpoint, with_config=True)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    modality = getattr(getattr(model, "backbone", model), "modality", "image")
    text = modality == "text"
    labels = class_names(meta["data"], meta) if modality == "image" else None
    try:
        with torch.no_grad():
            hf = to_hf(model, out, data=cfg.data, labels=labels)
    except ValueError as e:  # e.g. a two-tower model no transformers class holds: the error names why
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (
        hf is None
    ):  # no transformers class: Tessera's safetensors layout (to_hf says why in tessera_model.json)
        why = json.loads((out / TESSERA_LAYOUT).read_text())["no_hf_export"]
        (out / "tessera.json").write_text(json.dumps(meta, indent=1))
        print(
            f"exported {meta['checkpoint']} (step {meta['step']}) in Tessera's safetensors layout to {out}: {why}"
        )
        return 0
    if text:
        card = text_model_card(cfg, meta, hf, str(out), final_loss(meta))
    elif modality == "image_text":
        pre = Preprocess.from_data(cfg.data)
        card = image_text_model_card(cfg, meta, hf, str(out), pre, final_loss(meta))
    else:
        labelled = set_labels(hf, labels)  # (to_hf named them already: this says whether they fit)
        card = model_card(cfg, meta, hf, str(out), Preprocess.from_data(cfg.data), labelled, final_loss(meta))
    (out / "README.md").write_text(card)
    (out / "tessera.json").write_text(json.dumps(meta, indent=1))
    print(f"exported {meta['checkpoint']} (step {meta['step']}) as {type(hf).__name__} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
