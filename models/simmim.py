"""SimMIM pieces (Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", 2022): the final feature
map of any backbone, the one-layer decoder, the masked L1 loss.

Pure functions and the decoder module live here (next to their HF key maps in swin_hf.py, swin_v2_hf.py and
vit_hf.py, whose *ForMaskedImageModeling hold the same `decoder.0.*`); `pretrain.objectives.simmim` wires them
to a backbone and draws the masks (models/masking.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.masking import upsample_mask


def final_stride(backbone: nn.Module) -> int:
    """s: the reduction of the backbone's last feature map (ViT: its patch size; Swin: patch * 2^(stages - 1))."""
    return int(backbone.feature_info[-1]["reduction"])


def final_feature_map(
    backbone: nn.Module, features: torch.Tensor, image_size: tuple[int, int]
) -> torch.Tensor:
    """`backbone.forward_features` output -> channels-first map (B, C, H/s, W/s), s = `final_stride`.

    Maps (B, C, h, w) (ConvNeXt, PoolFormer, PVT v2, MaxViT) are kept; tokens (B, P + L, C) (ViT, Swin, Swin V2)
    lose their P = `num_prefix_tokens` prefix tokens (ViT's cls token) and are laid out row-major on the grid,
    as transformers' *ForMaskedImageModeling reshape `last_hidden_state`."""
    H, W = image_size
    s = final_stride(backbone)
    h, w = H // s, W // s
    if features.ndim == 4:
        x = features  # (B, C, h, w)
    elif features.ndim == 3:
        tokens = features[:, getattr(backbone, "num_prefix_tokens", 0) :]  # (B, L, C)
        if tokens.shape[1] != h * w:
            raise ValueError(
                f"{type(backbone).__name__}: {tokens.shape[1]} tokens are not the {h}x{w} grid of a {H}x{W} "
                f"image at the final stride {s}"
            )
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)  # (B, C, h, w)
    else:
        raise ValueError(f"{type(backbone).__name__}: features of shape {tuple(features.shape)} are no map")
    if x.shape[-2:] != (h, w):
        raise ValueError(
            f"{type(backbone).__name__}: final map is {tuple(x.shape[-2:])}, not the {h}x{w} grid of a "
            f"{H}x{W} image at the final stride {s}"
        )
    return x


class SimMIMDecoder(nn.Sequential):
    """1x1 conv C -> s*s*in_chans, then PixelShuffle(s): one prediction of every pixel from the final map
    (B, C, H/s, W/s) -> (B, in_chans, H, W). State-dict keys `0.weight`, `0.bias`: transformers' `decoder.0.*`.
    PyTorch's default conv init, as SimMIM (transformers' _init_weights draws N(0, 0.02) instead)."""

    def __init__(self, num_features: int, stride: int, in_chans: int):
        super().__init__(
            nn.Conv2d(num_features, stride * stride * in_chans, kernel_size=1), nn.PixelShuffle(stride)
        )
        self.num_features, self.stride, self.in_chans = num_features, stride, in_chans


def simmim_loss(images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's (and transformers') masked L1: sum |x - rec| over masked pixels and channels, divided by
    (masked pixels + 1e-5) and by the channel count, in fp32.

    images, reconstruction: (B, C, H, W); mask: (B, h, w) bool on any grid that divides the image (the stem grid),
    True = masked. Visible pixels take no part (not even a NaN there reaches the loss); an all-visible batch gives
    0. The target is the input as the model sees it (normalized with the dataset's mean/std)."""
    B, C, H, W = images.shape
    if H % mask.shape[1] or W % mask.shape[2] or H // mask.shape[1] != W // mask.shape[2]:
        raise ValueError(f"mask grid {tuple(mask.shape[1:])} does not tile the {H}x{W} image in square cells")
    m = upsample_mask(mask, H // mask.shape[1]).unsqueeze(1)  # (B, 1, H, W)
    l1 = (images.float() - reconstruction.float()).abs()  # (B, C, H, W)
    masked = torch.where(m, l1, l1.new_zeros(()))
    return masked.sum() / (m.sum() + 1e-5) / C


# --- transformers' *ForMaskedImageModeling: the decoder's keys (the encoder's are the family's, under a prefix) ----


def decoder_to_hf(decoder: SimMIMDecoder) -> dict[str, torch.Tensor]:
    """{"decoder.0.weight", "decoder.0.bias"}: the decoder as transformers' MIM models hold it (fp32, CPU)."""
    return {f"decoder.{k}": v.detach().float().cpu().contiguous() for k, v in decoder.state_dict().items()}


def split_mim_state(sd: dict[str, torch.Tensor], prefix: str, what: str) -> tuple[dict, dict]:
    """A *ForMaskedImageModeling state dict -> (the encoder's keys, still under `prefix`; the decoder's
    state dict `0.weight`, `0.bias`); ValueError naming any key that is neither."""
    enc = {k: v for k, v in sd.items() if k.startswith(prefix)}
    dec = {k[len("decoder.") :]: v for k, v in sd.items() if k.startswith("decoder.")}
    other = sorted(set(sd) - set(enc) - {f"decoder.{k}" for k in dec})
    if other or set(dec) != {"0.weight", "0.bias"}:
        raise ValueError(
            f"{what}: not a masked-image-modeling state dict (decoder {sorted(dec)}, other {other})"
        )
    return enc, dec
