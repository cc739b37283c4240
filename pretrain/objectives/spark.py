"""SparK and FCMAE: masked image modeling for convnets. The backbone encodes only the visible mask cells
(models/sparse.py: dense emulation of sparse convolution, zeros at masked positions), a decoder reconstructs the
pixels, and the loss counts masked patches only (one patch per mask cell).

Masks: `models.masking.random_cell_masks(seed, epoch, index, cells, ratio)` (True = masked; a pure function of the
run seed and each sample's epoch and id), cells of `mask_patch_size` pixels (None = the final stage's reduction,
32 for the standard sizes). The backbone is built as configured, with no mask token: everything the objective adds
(densifiers, mask tokens, decoder) lives outside it, so it exports as a plain ConvNextModel / ConvNextV2Model /
PoolFormerModel. Its head (final norm, classifier) takes no part and is frozen, so DDP sees no unused parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from models.convnext import ConvNeXt
from models.mae import patch_reconstruction_grid, patchify
from models.masking import check_ratio, mask_cells, random_cell_masks
from models.sparse import (
    GRN_STATS,
    FCMAEDecoder,
    SparKDecoder,
    final_reduction,
    masked_patch_loss,
    sparse_forward,
    stage_masks,
    supports_sparse,
)
from pretrain.errors import ConfigError
from pretrain.objectives import register_objective


def _validate(cfg) -> None:
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise ConfigError(f"objective.mask_ratio: must be in (0, 1), got {cfg.mask_ratio}")
    if cfg.mask_patch_size is not None and cfg.mask_patch_size <= 0:
        raise ConfigError(f"objective.mask_patch_size: must be > 0 (or null), got {cfg.mask_patch_size}")
    if cfg.grn_stats not in GRN_STATS:
        raise ConfigError(
            f"objective.grn_stats: must be one of {', '.join(GRN_STATS)}, got {cfg.grn_stats!r}"
        )
    if cfg.decoder_dim <= 0:
        raise ConfigError(f"objective.decoder_dim: must be > 0, got {cfg.decoder_dim}")


@dataclass
class SparKConfig:
    mask_ratio: float = 0.6  # fraction of mask cells hidden (ceil, models.masking.num_masked)
    mask_patch_size: int | None = None  # mask cell in pixels; None = the backbone's final reduction
    norm_pix_loss: bool = True  # regress per-patch normalized pixels
    grn_stats: str = "sample"  # ConvNeXt V2's GRN: "sample" (per sample) | "batch" (MinkowskiEngine's)
    decoder_dim: int = 768  # UNet width at the last stage's grid, halved per x2 upsampling (SparK: 768)

    def validate(self) -> None:
        _validate(self)


@dataclass
class FCMAEConfig:
    mask_ratio: float = 0.6
    mask_patch_size: int | None = None
    norm_pix_loss: bool = True
    grn_stats: str = "sample"
    decoder_dim: int = 512  # FCMAE: 512
    decoder_depth: int = 1  # dense ConvNeXt V2 blocks in the decoder (FCMAE: 1)

    def validate(self) -> None:
        _validate(self)
        if self.decoder_depth < 1:
            raise ConfigError(f"objective.decoder_depth: must be >= 1, got {self.decoder_depth}")


class _SparseMIM(nn.Module):
    """What SparK and FCMAE share: masks, the sparse encoder, the loss, visuals. Subclasses build `self.decoder`
    and implement `decode(feats, masks) -> (B, C, H, W)` pixels."""

    needs_seed = True
    name = ""

    def __init__(self, backbone: nn.Module, cfg, seed: int = 0):
        super().__init__()
        if not self.supports(backbone):
            raise ValueError(
                f"{self.name} cannot train {type(backbone).__name__}: it has no sparse emulation here"
            )
        if getattr(backbone, "mask_token", None) is not None:
            raise ValueError(
                f"{self.name} zeroes masked positions and keeps its mask tokens outside the backbone; build it "
                "without one (drop model.kwargs.mask_token)"
            )
        self.cfg, self.seed, self.backbone = cfg, seed, backbone
        self.patch = cfg.mask_patch_size or final_reduction(backbone)
        self.grid(backbone.img_size)  # ConfigError now if the configured size cannot be masked
        for module in (backbone.norm, backbone.head):  # forward_head: unused here
            module.requires_grad_(False)

    def grid(self, image_size) -> tuple[int, int]:
        """(rows, cols) of mask cells; ConfigError naming objective.mask_patch_size / objective.mask_ratio."""
        try:
            cells = mask_cells(image_size, self.patch, final_reduction(self.backbone), what="final stage")
        except ValueError as e:
            raise ConfigError(f"objective.mask_patch_size: {e}") from e
        try:
            check_ratio(cells[0] * cells[1], self.cfg.mask_ratio, "objective.mask_ratio")
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return cells

    def forward(self, batch: dict, mask: torch.Tensor | None = None) -> dict:
        """batch["image"] (B, C, H, W); `mask` (B, rows, cols) bool, True = masked (default: drawn from the run
        seed and batch["epoch"], batch["index"]). Returns loss, pred (B, L, p*p*C) and mask (B, L) 1 = masked."""
        images = batch["image"]
        cells = self.grid(tuple(images.shape[-2:]))
        if mask is None:  # drawn on the CPU: FLOP counting runs under torch.device("meta"), which would
            with torch.device("cpu"):  # otherwise catch the draw's own CPU tensors (models.masking)
                mask = random_cell_masks(
                    self.seed, batch["epoch"], batch["index"], cells, self.cfg.mask_ratio
                )
        if mask.shape != (images.shape[0], *cells):
            raise ValueError(
                f"mask is {tuple(mask.shape)}, the mask-cell grid is {(images.shape[0], *cells)}"
            )
        mask = mask.to(images.device)
        active = ~mask  # True = visible
        feats = sparse_forward(self.backbone, images, active, self.cfg.grn_stats)  # [(B, C_i, H_i, W_i)]
        recon = self.decode(feats, stage_masks(self.backbone, active, tuple(images.shape[-2:])))
        pred = patchify(recon, self.patch)  # (B, L, p*p*C)
        loss = masked_patch_loss(pred, images, mask, self.cfg.norm_pix_loss)
        return {"loss": loss, "pred": pred.detach(), "mask": mask.flatten(1).float()}

    @torch.no_grad()
    def visuals(self, batch: dict, out: dict, n: int = 8) -> dict[str, torch.Tensor]:
        """A grid, one row per image: original | masked input | reconstruction (visible patches pasted)."""
        images = batch["image"][:n].float()
        pred, mask = out["pred"][:n].float(), out["mask"][:n].float()
        grid = patch_reconstruction_grid(images, pred, mask, self.patch, self.cfg.norm_pix_loss)
        return {f"{self.name}/reconstruction": grid}


@register_objective("spark")
class SparK(_SparseMIM):
    """SparK (Tian et al. 2023): a sparse convnet encoder, every stage densified (sparse LayerNorm, per-stage mask
    token, projection) into a light UNet decoder; ConvNeXt, ConvNeXt V2 and PoolFormer."""

    Config = SparKConfig
    name = "spark"

    @classmethod
    def supports(cls, backbone: nn.Module) -> bool:
        return supports_sparse(backbone)

    def __init__(self, backbone: nn.Module, cfg: SparKConfig, seed: int = 0):
        super().__init__(backbone, cfg, seed)
        info = backbone.feature_info
        try:
            self.decoder = SparKDecoder(
                [f["num_chs"] for f in info],
                [f["reduction"] for f in info],
                backbone.in_chans,
                cfg.decoder_dim,
            )
        except ValueError as e:
            raise ConfigError(f"objective.decoder_dim: {e}") from e

    def decode(self, feats: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(feats, masks)  # (B, C, H, W)


@register_objective("fcmae")
class FCMAE(_SparseMIM):
    """FCMAE (ConvNeXt V2, Woo et al. 2023): the sparse encoder's last stage, a mask token at masked cells, one
    dense ConvNeXt V2 block, pixels per last-stage cell. FCMAE is V2's recipe, co-designed with GRN; V1 ConvNeXt
    (no GRN) trains too, as the paper's V1 + FCMAE ablation does."""

    Config = FCMAEConfig
    name = "fcmae"

    @classmethod
    def supports(cls, backbone: nn.Module) -> bool:
        return isinstance(backbone, ConvNeXt)

    def __init__(self, backbone: nn.Module, cfg: FCMAEConfig, seed: int = 0):
        super().__init__(backbone, cfg, seed)
        self.decoder = FCMAEDecoder(
            backbone.num_features,
            final_reduction(backbone),
            backbone.in_chans,
            dim=cfg.decoder_dim,
            depth=cfg.decoder_depth,
        )

    def decode(self, feats: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(feats[-1], masks[-1])  # (B, C, H, W)
