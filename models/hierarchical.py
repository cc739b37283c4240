"""What the hierarchical backbones (ConvNeXt, PoolFormer, PVT v2, Swin, Swin V2, MaxViT) share of the contract in
models/__init__.py. A family subclasses `HierarchicalBackbone` and provides three hooks:
  embed(images, mask=None) -> x: the stem output, in the layout its first stage takes (`replace_masked` applies
      the stem mask)
  run_stage(i, x) -> stage i's output, which is the input of stage i + 1 (default: `self.stages[i](x)`)
  stage_map(i, x) -> that output as a map (B, C_i, H_i, W_i) (default: x, for channels-first families)
Families keep what genuinely differs: forward_head, group_matcher, no_weight_decay, hparams, init_weights, and
forward_features where the last stage's output is not the features as they are (Swin's final norm).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def run_blocks(owner: nn.Module, blocks, x: torch.Tensor, *args) -> torch.Tensor:
    """x through `blocks` in order (each called as blk(x, *args)), each under activation checkpointing while
    `owner.grad_checkpointing` is set and `owner` trains with grad enabled."""
    for blk in blocks:
        x = run_block(owner, blk, x, *args)
    return x


def run_block(owner: nn.Module, blk: nn.Module, *args) -> torch.Tensor:
    """blk(*args), checkpointed as in `run_blocks` (for stages whose blocks take different arguments)."""
    if owner.grad_checkpointing and owner.training and torch.is_grad_enabled():
        return checkpoint(blk, *args, use_reentrant=False)
    return blk(*args)


def replace_masked(
    x: torch.Tensor, mask: torch.Tensor | None, token: torch.Tensor | None, layout: str, grid: str = "stem"
) -> torch.Tensor:
    """x with the positions where `mask` (B, H, W) is True replaced by `token` (broadcastable to x: (1, C, 1, 1)
    channels-first, (1, 1, C) or (1, 1, 1, C) channels-last) or by zeros (`token` None). `layout` is
    "channels_first" (x: (B, C, H, W)) or "channels_last" (x: (B, H, W, C)); a mask of another shape raises
    ValueError naming the `grid` it should match."""
    if mask is None:
        return x
    if layout == "channels_first":
        shape, m = (x.shape[0], *x.shape[2:]), mask.unsqueeze(1)  # (B, 1, H, W)
    elif layout == "channels_last":
        shape, m = tuple(x.shape[:3]), mask.unsqueeze(-1)  # (B, H, W, 1)
    else:
        raise ValueError(f"layout must be 'channels_first' or 'channels_last', got {layout!r}")
    if mask.shape != shape:
        raise ValueError(f"mask is {tuple(mask.shape)}, the {grid} grid is {shape}")
    fill = x.new_zeros(()) if token is None else token.to(x.dtype)
    return torch.where(m, fill, x)


class HierarchicalBackbone(nn.Module):
    """The shared contract pieces of the hierarchical families (models/__init__.py); see the hooks below."""

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None):
        raise NotImplementedError

    def run_stage(self, i: int, x):
        return self.stages[i](x)

    def stage_map(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last stage's output, un-normed, in the family's layout."""
        x = self.embed(images, mask)
        for i in range(len(self.feature_info)):
            x = self.run_stage(i, x)
        return x

    def forward_intermediates(
        self, images: torch.Tensor, indices: list[int] | None = None, mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Stage outputs (B, C_i, H_i, W_i) for `indices` (default: every stage; negative ones count from the
        end); only the stages up to the deepest one asked for run."""
        n = len(self.feature_info)
        order = list(range(n)) if indices is None else [i % n for i in indices]
        x, out = self.embed(images, mask), {}
        for i in range(max(order) + 1):
            x = self.run_stage(i, x)
            if i in order:
                out[i] = self.stage_map(i, x)
        return [out[i] for i in order]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block: sets each flag `run_blocks` reads (ConvNeXt keeps one on the
        model, the others one per stage)."""
        for m in self.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self.init_head(self.head)

    def init_head(self, head: nn.Linear) -> None:
        """A new classifier: truncated-normal(0.02) weight, zero bias (MaxViT keeps PyTorch's default, as timm)."""
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
