"""Masked autoencoder pieces (He et al. 2022): random masking, the lightweight decoder, the pixel loss.

Pure functions and the decoder module live here (next to their HF key map in `vit_hf.py`);
`pretrain.objectives.mae` wires them to a backbone.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.layers import Block, init_mae_weights, sincos_pos_embed_2d


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), each patch flattened row-major with channels last (MAE's order)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W) for a square grid."""
    B, L, _ = patches.shape
    g = int(L**0.5)
    x = patches.reshape(B, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, g * p, g * p)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    return int(num_patches * (1 - mask_ratio))


def random_masking(noise: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random subset from uniform noise (B, L): the lowest-noise patches are kept.

    Returns ids_keep (B, K), mask (B, L) float with 1 = masked, ids_restore (B, L) that undoes the shuffle.
    """
    B, L = noise.shape
    keep = num_kept(L, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, L, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle[:, :keep], mask, ids_restore


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """Mean squared error over masked patches; target patches normalized by their own mean/std if norm_pix."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as in MAE
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


def reconstruction_grid(images: torch.Tensor, masked: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """One row per image, original | masked input | reconstruction, each scaled to [0, 1] by the original's range:
    (n, C, H, W) x 3 -> (3, n*H, 3*W) (a grayscale grid repeated to RGB), for TensorBoard."""
    lo = images.amin(dim=(1, 2, 3), keepdim=True)
    hi = images.amax(dim=(1, 2, 3), keepdim=True)
    panels = [((x - lo) / (hi - lo + 1e-6)).clamp(0, 1) for x in (images, masked, recon)]
    rows = torch.cat(panels, dim=3)  # (n, C, H, 3W)
    grid = torch.cat(list(rows), dim=1)  # (C, nH, 3W)
    return grid.expand(3, -1, -1) if grid.shape[0] == 1 else grid


def patch_reconstruction_grid(
    images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool
) -> torch.Tensor:
    """`reconstruction_grid` from per-patch predictions (n, L, p*p*C) of masked patches (mask (n, L), 1 = masked),
    visible patches pasted; normalized-pixel predictions are mapped back with each patch's own statistics."""
    c = images.shape[1]
    target = patchify(images, p)  # (n, L, p*p*C)
    if norm_pix:
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    m = mask.unsqueeze(-1)
    masked = unpatchify(target * (1 - m), p, c)
    return reconstruction_grid(images, masked, unpatchify(target * (1 - m) + pred * m, p, c))


class MAEDecoder(nn.Module):
    """Narrow transformer that fills masked positions with a shared token and predicts their pixels."""

    def __init__(
        self,
        num_patches: int,
        encoder_dim: int,
        patch_size: int,
        in_chans: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        attn_backend: str = "auto",
    ):
        super().__init__()
        grid = int(num_patches**0.5)
        if grid * grid != num_patches:
            raise ValueError(f"the MAE decoder needs a square patch grid, got {num_patches} patches")
        self.dim, self.depth, self.num_heads, self.mlp_ratio = dim, depth, num_heads, mlp_ratio
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, True, 0.0, norm_eps, attn_backend) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.pred = nn.Linear(dim, patch_size * patch_size * in_chans)
        self.apply(init_mae_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + K, De) in ids_keep order -> pixel predictions (B, L, p*p*C) in image order."""
        x = self.decoder_embed(latent)  # (B, 1 + K, D)
        B, L = ids_restore.shape
        masked = self.mask_token.expand(B, L - (x.shape[1] - 1), -1)  # (B, L - K, D)
        x_ = torch.cat([x[:, 1:], masked], dim=1)  # shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # image order
        x = torch.cat([x[:, :1], x_], dim=1) + self.pos_embed.to(x.dtype)  # (B, 1 + L, D)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]  # drop cls -> (B, L, p*p*C)
