"""Model zoo. `create_model(name, **overrides)` builds any registered backbone; nothing here imports pretrain.

Backbone contract (every registered model; tests/test_models.py checks it over the whole registry):
  __init__(..., img_size, in_chans, num_classes=0, drop_path_rate=0.0, ...)  (build.py passes the data's size)
  forward_features(images) -> final features exactly as the HF twin's last_hidden_state (the family's natural
      layout): ViT, Swin, Swin V2 tokens (B, L, D) after the final norm; PVT v2 the map after the last stage's
      norm; ConvNeXt, PoolFormer, MaxViT the last stage map un-normed (their norm sits in forward_head).
      Hierarchical families take `mask=None`: (B, H/s, W/s) bool at the stem grid (s = `stem_stride`),
      True = masked, replaced by a learned mask token (`mask_token=True`) or zeros
  (fixed_input_size = True: the model runs at img_size only (ViT); the others run at any size)
  forward_head(features, pre_logits=False) -> pooled (B, num_features) or logits (B, num_classes)
  forward_intermediates(images, indices=None) -> [(B, C_i, H_i, W_i)] for `feature_info[i]`, in the order of
      `indices` (default: all)
  forward(images) = forward_head(forward_features(images))
  feature_info [{num_chs, reduction, module}], num_features, no_weight_decay(), group_matcher() (regexes for
  layer-wise LR decay), set_grad_checkpointing(), reset_classifier(num_classes), hparams() (rebuilds it)
Each registered factory carries `builds` (the class its kwargs are checked against) and `smoke` (overrides that
make the size cheap for CPU tests: fewer blocks, a smaller input; widths and heads unchanged); a family registers
its size table with `models.registry.register_sizes`. The hierarchical families share the generic parts of the
contract through `models.hierarchical.HierarchicalBackbone`.
"""

from __future__ import annotations

import torch.nn as nn

# each family registers its sizes, and its HF twin's adapter (models/hf.py)
from models import (  # noqa: F401
    clip_text,
    convnext,
    convnext_hf,
    crossvit,  # no transformers twin: models/crossvit_timm.py maps it to timm's reference, for tests
    cswin,
    cvt,
    cvt_hf,
    davit,
    hornet,
    llama,
    llama_hf,
    maxvit,  # no transformers twin: models/maxvit_timm.py maps it to timm's reference, for tests and benchmarks
    mobilenet_v2,  # no HF adapter: torchvision's state-dict layout, tested against torchvision
    modernbert,
    modernbert_hf,
    nat,
    poolformer,
    poolformer_hf,
    pvt_v2,
    pvt_v2_hf,
    swin,
    swin_hf,
    swin_v2,
    swin_v2_hf,
    tiny_vit,  # no transformers twin: models/tiny_vit_timm.py maps it to timm's reference
    two_tower,  # image-text: any image backbone + any text model (builds its towers through create_model)
    vit,
    vit_hf,
)
from models.registry import MODELS, Registry, check_kwargs


def create_model(name: str, **overrides) -> nn.Module:
    """Build registered model `name`; `overrides` replace its default constructor arguments."""
    factory = MODELS.get(name)
    check_kwargs(factory, overrides, where=f"model {name!r}")
    return factory(**overrides)


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.names(pattern)


__all__ = ["MODELS", "Registry", "check_kwargs", "create_model", "list_models"]
