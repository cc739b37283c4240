"""Export to Hugging Face format, and import back.

    python -m pretrain.export RUN_DIR_OR_CHECKPOINT OUT_DIR

consolidates the checkpoint (any engine, any ZeRO stage) and writes OUT_DIR loadable offline by transformers:
an MAE run gives `ViTMAEForPreTraining.from_pretrained(OUT_DIR)`, plus OUT_DIR/encoder for `ViTModel`; any other
run exports its backbone through the family's adapter (models/hf.py): `SwinModel`, `ConvNextModel`, ... or
`<Family>ForImageClassification` when the backbone has a classifier head. The key maps live next to the models.
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

from models.hf import adapter_for_arch, adapter_for_model
from models.vit_hf import decoder_from_hf, decoder_kwargs_from_hf, mae_to_hf, vit_from_hf, vit_to_hf
from pretrain.checkpoint import find_latest, read_meta
from pretrain.config import from_dict
from pretrain.objectives.mae import MAE, MAEConfig


def to_hf(model: nn.Module, out_dir: str | Path) -> nn.Module:
    """Write the HF folder for a Tessera model (an MAE objective, another objective's backbone, or a bare
    backbone); return the HF model."""
    out = Path(out_dir)
    if isinstance(model, MAE):
        hf = mae_to_hf(model.backbone, model.decoder, model.cfg.mask_ratio, model.cfg.norm_pix_loss)
        vit_to_hf(model.backbone).save_pretrained(out / "encoder", safe_serialization=True)
    else:
        backbone = getattr(model, "backbone", model)  # objectives hold theirs as .backbone
        hf = adapter_for_model(backbone).to_hf(backbone)
    hf.save_pretrained(out, safe_serialization=True)
    return hf


def from_hf(hf_dir: str | Path) -> nn.Module:
    """Build the Tessera model from an HF folder written by `to_hf`, or any folder of a supported architecture
    (ViTMAE, or one a family adapter imports: ViT, Swin, ConvNeXt, ...)."""
    from safetensors.torch import load_file

    from ops.compat import import_transformers

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json: not a Hugging Face model folder")
    config = import_transformers().AutoConfig.from_pretrained(str(hf_dir))
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir} has no *.safetensors weights")
    sd = {k: v for f in files for k, v in load_file(str(f)).items()}
    arch = (config.architectures or [""])[0]
    if arch == "ViTMAEForPreTraining":
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
    return adapter.from_hf(sd, config).eval()


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


def load_checkpoint_model(path: str | Path) -> tuple[nn.Module, dict]:
    """(model with consolidated fp32 weights, meta) from a run directory or checkpoint folder."""
    from pretrain.build import build_model
    from pretrain.engine import consolidated_state_dict

    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    cfg = from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
    model = build_model(cfg)
    state = consolidated_state_dict(str(folder / "engine"), meta["engine"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{folder}: checkpoint does not match its config (missing {missing}, unexpected {unexpected})"
        )
    return model.float().eval(), {**meta, "checkpoint": str(folder), "data": dataclasses.asdict(cfg.data)}


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
        model, meta = load_checkpoint_model(args.checkpoint)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with torch.no_grad():
        hf = to_hf(model, args.out_dir)
    (Path(args.out_dir) / "tessera.json").write_text(json.dumps(meta, indent=1))
    print(f"exported {meta['checkpoint']} (step {meta['step']}) as {type(hf).__name__} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
