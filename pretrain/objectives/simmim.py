"""SimMIM objective: replace random cells of the stem's patch embeddings by a learned mask token, encode every
position, predict all pixels from the final feature map with a 1x1 conv, and score L1 on the masked pixels.

Trains any image backbone whose `forward_features` takes a stem-grid `mask` and that names its `stem_stride`
(ViT, Swin, Swin V2, PVT v2, MaxViT, ConvNeXt/V2, PoolFormer). Masks come from models.masking: a sample's cells
are a pure function of (run seed, epoch, sample id), so a resumed or elastic run draws the same ones.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from models.mae import reconstruction_grid
from models.masking import check_ratio, mask_cells, random_cell_masks, upsample_mask
from models.simmim import SimMIMDecoder, final_feature_map, final_stride, simmim_loss
from pretrain.errors import ConfigError
from pretrain.objectives import register_objective


@dataclass
class SimMIMConfig:
    mask_ratio: float = 0.6  # fraction of mask cells hidden: ceil(cells * ratio) of them (models.masking)
    mask_patch_size: int = (
        32  # side of a mask cell in pixels: a multiple of the stem stride, dividing the image
    )

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"objective.mask_ratio: must be in (0, 1), got {self.mask_ratio}")
        if self.mask_patch_size <= 0:
            raise ConfigError(f"objective.mask_patch_size: must be > 0, got {self.mask_patch_size}")


@register_objective("simmim")
class SimMIM(nn.Module):
    Config = SimMIMConfig
    backbone_kwargs = {"mask_token": True}  # pretrain.build builds the backbone with a learned mask token
    needs_seed = True  # the masks are drawn from the run seed

    @classmethod
    def supports(cls, backbone: nn.Module) -> bool:
        """An image backbone whose forward_features takes a stem-grid `mask` and that has a `stem_stride`."""
        encode = getattr(backbone, "forward_features", None)
        return (
            encode is not None
            and getattr(backbone, "modality", "image") == "image"
            and "mask" in inspect.signature(encode).parameters
            and hasattr(backbone, "stem_stride")
            and hasattr(backbone, "feature_info")
        )

    def __init__(self, backbone: nn.Module, cfg: SimMIMConfig, seed: int = 0):
        super().__init__()
        if not self.supports(backbone):
            raise ValueError(
                f"SimMIM needs an image backbone whose forward_features takes a stem-grid mask (stem_stride); "
                f"{type(backbone).__name__} is not one"
            )
        self.cfg, self.seed, self.backbone = cfg, seed, backbone
        h = backbone.hparams()
        self.image_size, self.in_chans = int(h["img_size"]), int(h["in_chans"])
        self.stem_stride, self.stride = int(backbone.stem_stride), final_stride(backbone)
        size = self.image_size
        try:
            self.cells = mask_cells(size, cfg.mask_patch_size, self.stem_stride)  # (rows, cols)
        except ValueError as e:
            raise ConfigError(f"objective.mask_patch_size: {e} (data.image_size {size})") from e
        try:
            check_ratio(self.cells[0] * self.cells[1], cfg.mask_ratio, "objective.mask_ratio")
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if size % self.stride:
            raise ConfigError(
                f"data.image_size: {size} is not divisible by the final stride {self.stride} of "
                f"{type(backbone).__name__}: the decoder's pixel shuffle rebuilds (H/{self.stride}) * {self.stride}"
            )
        self.scale = cfg.mask_patch_size // self.stem_stride  # stem cells per mask cell, per side
        self.check_grids()
        num_chs = int(backbone.feature_info[-1]["num_chs"])
        self.decoder = SimMIMDecoder(num_chs, self.stride, self.in_chans)

    def check_grids(self) -> None:
        """The stem grid must be (H/stem_stride)^2 and the final map (H/s)^2 at the training size: checked by a
        forward of the same architecture on the meta device (no memory, no FLOPs). PoolFormer's stem
        (k7 s4 p2) has floor((H - 3) / 4) + 1 rows: H/4 for every size mask_cells allows, named here otherwise."""
        size, n = self.image_size, self.image_size // self.stem_stride
        with torch.device("meta"):
            twin = type(self.backbone)(**self.backbone.hparams())
            images = torch.empty(2, self.in_chans, size, size)  # 2: BatchNorm (MaxViT) trains on > 1 value
            mask = torch.zeros(2, n, n, dtype=torch.bool)
            try:
                fmap = final_feature_map(twin, twin.forward_features(images, mask=mask), (size, size))
            except ValueError as e:
                raise ConfigError(
                    f"objective.mask_patch_size: a {size}x{size} image gives {type(self.backbone).__name__} no "
                    f"{n}x{n} stem grid (stem stride {self.stem_stride}) or final map at stride {self.stride}: {e}"
                ) from e
            # what the encoder never reads here (ConvNeXt's, PoolFormer's, MaxViT's pooled-head norm and the
            # head) is frozen: DDP refuses parameters that take no part in the loss
            fmap.float().sum().backward()
        unused = {name for name, p in twin.named_parameters() if p.grad is None}
        for name, p in self.backbone.named_parameters():
            if name in unused:
                p.requires_grad_(False)

    def draw_mask(self, batch: dict) -> torch.Tensor:
        """(B, H/stem, W/stem) bool, True = masked: each sample's cells from (seed, epoch, index), upsampled."""
        if "epoch" not in batch or "index" not in batch:
            raise KeyError(
                "SimMIM draws masks from batch['epoch'] and batch['index'] (the loader gives both)"
            )
        # drawn on the CPU, then moved to the batch's device (FLOP counting builds under torch.device("meta"),
        # where the draw's own CPU tensors would otherwise land on the meta device)
        with torch.device("cpu"):
            cells = random_cell_masks(
                self.seed, batch["epoch"], batch["index"], self.cells, self.cfg.mask_ratio
            )
        return upsample_mask(cells, self.scale)

    def forward(self, batch: dict, mask: torch.Tensor | None = None) -> dict:
        """`mask` (B, H/stem, W/stem) bool overrides the drawn one (tests, HF parity: bool_masked_pos =
        mask.flatten(1))."""
        images = batch["image"]  # (B, C, H, W)
        if mask is None:
            mask = self.draw_mask(batch)
        mask = mask.to(device=images.device, dtype=torch.bool)
        features = self.backbone.forward_features(images, mask=mask)
        fmap = final_feature_map(self.backbone, features, tuple(images.shape[-2:]))  # (B, C_s, H/s, W/s)
        rec = self.decoder(fmap)  # (B, C, H, W)
        loss = simmim_loss(images, rec, mask)  # fp32 even under bf16
        return {"loss": loss, "pred": rec.detach(), "mask": mask}

    @torch.no_grad()
    def visuals(self, batch: dict, out: dict, n: int = 8) -> dict[str, torch.Tensor]:
        """A grid, one row per image: original | masked input | reconstruction (visible pixels pasted)."""
        images = batch["image"][:n].float()  # (n, C, H, W)
        pred, mask = out["pred"][:n].float(), out["mask"][:n]
        m = upsample_mask(mask, images.shape[-1] // mask.shape[-1]).unsqueeze(1).float()  # (n, 1, H, W)
        masked = images * (1 - m)
        return {"simmim/reconstruction": reconstruction_grid(images, masked, masked + pred * m)}
