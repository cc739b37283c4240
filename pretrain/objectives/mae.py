"""MAE objective: mask most patches, encode the rest, reconstruct the masked pixels."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from models.mae import MAEDecoder, mae_loss, patch_reconstruction_grid, patchify, random_masking
from pretrain.errors import ConfigError
from pretrain.objectives import register_objective


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75  # fraction of patches hidden from the encoder
    norm_pix_loss: bool = True  # regress per-patch normalized pixels
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"objective.mask_ratio: must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError("objective.decoder_dim: must be divisible by objective.decoder_heads")
        if self.decoder_dim % 4:
            raise ConfigError(
                "objective.decoder_dim: must be divisible by 4 (2-D sin-cos position embedding)"
            )


@register_objective("mae")
class MAE(nn.Module):
    Config = MAEConfig

    @classmethod
    def supports(cls, backbone: nn.Module) -> bool:
        """A ViT-style backbone that encodes a subset of its patch tokens (`forward_features(..., ids_keep=)`)."""
        encode = getattr(backbone, "forward_features", None)
        return encode is not None and "ids_keep" in inspect.signature(encode).parameters

    def __init__(self, backbone: nn.Module, cfg: MAEConfig):
        super().__init__()
        if not self.supports(backbone):
            raise ValueError(
                f"MAE needs a ViT-style backbone that encodes a subset of patch tokens (ids_keep); "
                f"{type(backbone).__name__} is not one (hierarchical families take a mask for SimMIM/SparK instead)"
            )
        if getattr(backbone, "reduces_tokens", False):  # the decoder puts one token back per kept patch
            switch = "tome_r" if backbone.tome_r > 0 else "evit_keep_rate"
            raise ConfigError(
                f"model.kwargs.{switch}: MAE's decoder needs one encoder token per kept patch, and {switch} "
                "merges or drops them; pretrain without it, then fine-tune with it (model.init_from)"
            )
        self.cfg = cfg
        self.backbone = backbone
        self.decoder = MAEDecoder(
            backbone.num_patches,
            backbone.num_features,
            backbone.patch_size,
            backbone.in_chans,
            dim=cfg.decoder_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads,
            mlp_ratio=cfg.decoder_mlp_ratio,
            norm_eps=backbone.norm_eps,
        )

    def forward(self, batch: dict, noise: torch.Tensor | None = None) -> dict:
        images = batch["image"]  # (B, C, H, W)
        B, L = images.shape[0], self.backbone.num_patches
        if noise is None:
            noise = torch.rand(B, L, device=images.device)  # global RNG, seeded per step by the loop
        ids_keep, mask, ids_restore = random_masking(noise, self.cfg.mask_ratio)
        latent = self.backbone.forward_features(images, ids_keep=ids_keep)  # (B, P + K, D)
        if self.backbone.num_prefix_tokens > 1:  # DeiT: [cls, dist, kept]: the decoder reads [cls, kept]
            latent = torch.cat([latent[:, :1], latent[:, self.backbone.num_prefix_tokens :]], dim=1)
        pred = self.decoder(latent, ids_restore)  # (B, L, p*p*C)
        target = patchify(images.float(), self.backbone.patch_size)  # normalized in fp32 even under bf16
        loss = mae_loss(pred, target, mask, self.cfg.norm_pix_loss)
        return {"loss": loss, "pred": pred.detach(), "mask": mask}

    @torch.no_grad()
    def visuals(self, batch: dict, out: dict, n: int = 8) -> dict[str, torch.Tensor]:
        """A grid, one row per image: original | masked input | reconstruction (visible patches pasted)."""
        images = batch["image"][:n].float()
        pred, mask = out["pred"][:n].float(), out["mask"][:n].float()
        grid = patch_reconstruction_grid(images, pred, mask, self.backbone.patch_size, self.cfg.norm_pix_loss)
        return {"mae/reconstruction": grid}
