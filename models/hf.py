"""Hugging Face twins: one adapter per backbone family, found by Tessera class (export) or HF architecture
(import). Each family's `<family>_hf.py` holds its key-map table and registers its adapter here.

An adapter converts both ways with the same weights and reads an HF model's outputs back in Tessera's layouts,
so one parity test covers every family:
  hf_outputs(hf_model, x)["features"] == model.forward_features(x)
  hf_outputs(hf_model, x)["stages"]   == model.forward_intermediates(x)        (every stage / block)
  hf_outputs(hf_model, x)["pooled"]   == model.forward_head(features, pre_logits=True)
  hf_outputs(hf_model, x)["logits"]   == model(x)                               (only with a classifier head)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from models.registry import Registry


@dataclass(frozen=True)
class HFAdapter:
    model_cls: type  # the Tessera backbone class
    archs: tuple[
        str, ...
    ]  # config.json `architectures` it imports, e.g. ("SwinModel", "SwinForImageClassification")
    hf_config: Callable[[nn.Module], Any]  # Tessera model -> transformers config of the same architecture
    to_hf: Callable[[nn.Module], nn.Module]  # -> XModel, or XForImageClassification with a head; eval()
    from_hf: Callable[
        [dict[str, torch.Tensor], Any], nn.Module
    ]  # (state dict, config) -> Tessera model, eval()
    hf_outputs: Callable[[nn.Module, torch.Tensor], dict[str, Any]]  # see the module docstring


HF_ADAPTERS = Registry("Hugging Face adapter")


def register_hf(family: str, adapter: HFAdapter) -> HFAdapter:
    HF_ADAPTERS.register(family)(adapter)
    return adapter


def _adapters() -> list[HFAdapter]:
    return [HF_ADAPTERS.get(n) for n in HF_ADAPTERS.names()]


def adapter_for_model(model: nn.Module) -> HFAdapter:
    for a in _adapters():
        if type(model) is a.model_cls:
            return a
    names = ", ".join(a.model_cls.__name__ for a in _adapters())
    raise TypeError(f"no Hugging Face export for {type(model).__name__}; exportable: {names}")


def adapter_for_arch(arch: str) -> HFAdapter:
    for a in _adapters():
        if arch in a.archs:
            return a
    known = ", ".join(x for a in _adapters() for x in a.archs)
    raise ValueError(f"architecture {arch!r} has no Tessera import; importable: {known}")


def backbone_state(hf: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The base model's part of an HF state dict: the keys under `prefix` (e.g. "swin.", a classification
    model's), with it removed; without any such key (a base model's), every key but the classifier's."""
    if any(k.startswith(prefix) for k in hf):
        return {k[len(prefix) :]: v for k, v in hf.items() if k.startswith(prefix)}
    return {k: v for k, v in hf.items() if not k.startswith("classifier.")}


def swin_stages(base: nn.Module, x: torch.Tensor, **embed_kwargs) -> list[torch.Tensor]:
    """Stage i's blocks' output (B, C_i, H_i, W_i), before its patch merging, from a transformers SwinModel or
    Swinv2Model `base`: its encoder's output_hidden_states_before_downsampling, which the model's forward does
    not pass on ([0], the stem, left out)."""
    emb, dims = base.embeddings(x, **embed_kwargs)
    enc = base.encoder(emb, dims, output_hidden_states=True, output_hidden_states_before_downsampling=True)
    return list(enc.reshaped_hidden_states[1:])


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> nn.Module:
    """load_state_dict(strict) whose error names the converter, so a key-map slip is found at once."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{what}: key map mismatch (missing {missing}, unexpected {unexpected})")
    return model.eval()


# --- grayscale models for RGB pipelines ---------------------------------------------------------------------
# transformers' pipelines convert every image to RGB (image_utils.load_image), so a backbone trained on one
# channel is exported with three: its first layer (a convolution in every family) gets PIL's grayscale weights
# folded in. On an RGB image it computes what the 1-channel model computes on image.convert("L") (up to L's
# rounding to bytes); on a gray image (R = G = B) exactly its outputs, since the weights sum to 1. The normalization
# is the same per channel, so it folds through too. Exports mark such configs with GRAY_FROM_RGB_KEY.
GRAY_FROM_RGB = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma: PIL's "L" conversion
GRAY_FROM_RGB_KEY = "tessera_gray_from_rgb"


def input_conv_key(model: nn.Module) -> str:
    """State-dict key of the weight that first sees the image: found by building the architecture (on the meta
    device) with another channel count and keeping the one weight whose shape follows it."""
    h = model.hparams()
    with torch.device("meta"):
        probe = type(model)(**{**h, "in_chans": h["in_chans"] + 7})
    keys = [
        k
        for k, v in probe.state_dict().items()
        if v.ndim == 4 and v.shape[1] == h["in_chans"] + 7 and model.state_dict()[k].shape[1] == h["in_chans"]
    ]
    if len(keys) != 1:
        raise ValueError(
            f"{type(model).__name__}: no single input convolution to fold channels into ({keys})"
        )
    return keys[0]


def _with_input_weight(model: nn.Module, in_chans: int, make) -> nn.Module:
    key = input_conv_key(model)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd[key] = make(sd[key])
    copy = type(model)(**{**model.hparams(), "in_chans": in_chans})
    return load_strict(copy, sd, f"{type(model).__name__} with {in_chans} input channel(s)")


def rgb_from_gray(model: nn.Module) -> nn.Module:
    """A 3-channel copy of a 1-channel backbone whose first layer converts RGB to gray (see above); eval()."""
    if model.hparams()["in_chans"] != 1:
        raise ValueError(f"rgb_from_gray needs a 1-channel model, got in_chans={model.hparams()['in_chans']}")
    return _with_input_weight(model, 3, lambda w: torch.cat([w * k for k in GRAY_FROM_RGB], dim=1))


def gray_from_rgb(model: nn.Module) -> nn.Module:
    """The inverse of rgb_from_gray: the 1-channel backbone back (its weight is the sum over the 3 inputs)."""
    return _with_input_weight(model, 1, lambda w: w.sum(dim=1, keepdim=True))
