"""Image-text contrastive objectives over a two-tower model (models/two_tower.py): CLIP (InfoNCE), SigLIP
(sigmoid) and FILIP (token-wise late interaction). The losses and their cross-rank communication are
pretrain/objectives/contrastive_loss.py; this file draws the FLIP patch dropout and splits a step in two halves
so large batches are exact:

  embed(batch) -> features            the towers (the only part with activations worth caching)
  loss_of(features, scale, bias)      the loss over the whole batch of every rank (all-gathers inside)

With train.grad_accum_steps = k > 1 an engine never averages k small contrastive losses (fewer negatives: a
different objective). It runs GradCache (pretrain/engine/cached.py): embed all k chunks without a graph, the loss
once over all of them, then each chunk again with its RNG replayed, backpropagating the cached feature gradients
(`forward(batch, cached=...)`). The logit scale and bias get their gradient once, in the last chunk, so DDP and
DeepSpeed reduce it with everything else: every parameter equals the one-big-batch step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from pretrain.errors import ConfigError
from pretrain.objectives import register_objective
from pretrain.objectives.contrastive_loss import ClipLoss, FilipLoss, SigLipLoss

LOGIT_SCALE_MAX = math.log(100.0)  # the clamp of CLIP / open_clip: a temperature of at least 0.01


def _check_common(cfg) -> None:
    if not 0.0 <= cfg.patch_dropout < 1.0:
        raise ConfigError(f"objective.patch_dropout: must be in [0, 1), got {cfg.patch_dropout}")
    if cfg.chunk_size < 0:
        raise ConfigError(f"objective.chunk_size: must be >= 0 (0 = unchunked), got {cfg.chunk_size}")


@dataclass
class ClipConfig:
    # Each rank scores its b images against all N gathered texts (b x N logits, memory linear in N) rather than
    # the full N x N; both give the same loss and gradients (tests/test_contrastive_loss.py).
    local_loss: bool = True
    # FLIP: this fraction of the image tower's patches is dropped at random per sample and step during training
    # (ViT towers; none at eval). 0.5 halves the image tower's work.
    patch_dropout: float = 0.0
    # > 0 (with local_loss): the loss takes the local rows in blocks of this many, each block's logits recomputed
    # in backward, so its memory is O(chunk x N), not O(b x N): with GradCache on one rank b = N.
    chunk_size: int = 0

    def validate(self) -> None:
        _check_common(self)
        if self.chunk_size and not self.local_loss:
            raise ConfigError(
                "objective.chunk_size: chunks the local rows of the loss; it needs local_loss: true"
            )


@dataclass
class SigLipConfig:
    # How other ranks' text features reach this rank: "ring" (W-1 neighbour exchanges with autograd, O(b x E) in
    # flight) or "gather" (one all-gather with gradient, W*b x E).
    impl: str = "ring"
    # > 0: each b x b block of logits is computed in column chunks of this many texts (memory O(b x chunk)).
    chunk_size: int = 0
    patch_dropout: float = 0.0

    def validate(self) -> None:
        _check_common(self)
        if self.impl not in ("ring", "gather"):
            raise ConfigError(f"objective.impl: must be 'ring' or 'gather', got {self.impl!r}")


@dataclass
class FilipConfig:
    # > 0: the token-wise similarities are computed over column chunks of this many gathered samples, each
    # recomputed in backward, so memory stays O(b x chunk x n_image x n_text).
    chunk_size: int = 0
    patch_dropout: float = 0.0

    def validate(self) -> None:
        _check_common(self)


class Contrastive(nn.Module):
    """Shared by the three objectives: `backbone` is a two-tower model."""

    needs_seed = False
    tokens = False  # FILIP: token features instead of pooled embeddings

    @classmethod
    def supports(cls, backbone: nn.Module) -> bool:
        """Two-tower image-text models (models/two_tower.py)."""
        return getattr(backbone, "modality", "image") == "image_text"

    def __init__(self, backbone: nn.Module, cfg, loss: nn.Module):
        super().__init__()
        self.cfg, self.backbone, self.loss_fn = cfg, backbone, loss
        if cfg.patch_dropout and not hasattr(backbone.visual, "num_patches"):
            raise ConfigError(
                f"objective.patch_dropout: {cfg.patch_dropout} needs a ViT image tower (patch tokens to drop); "
                f"the image tower is {type(backbone.visual).__name__}"
            )
        self.freeze_unread()

    def freeze_unread(self) -> None:
        """Freeze what this objective's features never read (FILIP's token features skip a pooling head, the
        text tower's tied LM head is no input): DDP refuses parameters that take no part in the loss. Found by
        a backward through a twin built on the meta device (no memory, no compute)."""
        hp = self.backbone.hparams()
        size, n = hp["img_size"], hp["context_length"]
        with torch.device("meta"):
            twin = type(self.backbone)(**hp)
            batch = {
                "image": torch.empty(2, hp["in_chans"], size, size),
                "input_ids": torch.zeros(2, n, dtype=torch.long),
                "attention_mask": torch.ones(2, n, dtype=torch.long),
            }
            feats = features(twin, batch, None, self.tokens)
            scale, bias = twin.scale_and_bias()
            total = scale + (0 if bias is None else bias)
            for v in feats.values():
                total = total + v.float().sum() if v.is_floating_point() else total
            total.backward()
        unread = {name for name, p in twin.named_parameters() if p.grad is None}
        for name, p in self.backbone.named_parameters():
            if name in unread:
                p.requires_grad_(False)

    def param_bounds(self) -> dict[str, tuple[float, float]]:
        """Engines clamp these after every optimizer step (pretrain.engine.base.param_bounds): the raw logit scale
        stays in [0, ln 100] as in CLIP; scale_and_bias() also clamps it functionally, so the value the loss
        uses is in range even between steps."""
        return {"backbone.logit_scale": (0.0, LOGIT_SCALE_MAX)}

    # --- the two halves of a step -------------------------------------------------------------------------
    def patch_keep(self, batch: dict) -> torch.Tensor | None:
        """FLIP patch dropout: (B, K) indices of the patches each image keeps, K = round((1 - p) * L), drawn
        from the step's seeded RNG (pretrain.loop.seed_step), so a resumed run draws the same ones."""
        p = self.cfg.patch_dropout
        if not (p and self.training):
            return None
        images = batch["image"]
        n = self.backbone.visual.num_patches
        keep = max(1, round((1.0 - p) * n))
        noise = torch.rand(images.shape[0], n, device=images.device)  # (B, L)
        return noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, K), in patch order

    def embed(self, batch: dict) -> dict:
        """The towers: pooled embeddings (B, E), or FILIP's token features and the text mask."""
        return features(self.backbone, batch, self.patch_keep(batch), self.tokens)

    def loss_of(self, feats: dict, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: dict, cached: dict | None = None) -> dict:
        """Training: {"loss", "logit_scale", ["logit_bias"]}. GradCache (pretrain/engine/cached.py) calls it with
        `cached="graph"` for the features alone, then with the cached gradients for the surrogate whose gradient
        is the whole batch's, {"loss": sum(features * cached feature grads) [+ the scale/bias terms]} (its value
        means nothing)."""
        feats = self.embed(batch)
        scale, bias = self.backbone.scale_and_bias()
        if cached == "graph":  # GradCache's first pass: through __call__, so ZeRO-3 gathers the weights
            return {"features": feats, "scale": scale, "bias": bias}
        if cached is not None:
            return {"loss": surrogate(feats, cached, scale, bias)}
        loss = self.loss_of(feats, scale, bias)
        return {"loss": loss, **scalars(scale, bias)}


def features(tower: nn.Module, batch: dict, keep: torch.Tensor | None, tokens: bool) -> dict:
    """A two-tower model's normalized features of a batch: pooled (B, E) each, or (FILIP) image tokens
    (B, n1, E), text tokens (B, L, E) and the text mask."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if tokens:
        return {
            "image": tower.encode_image_tokens(batch["image"], ids_keep=keep),  # (B, n1, E)
            "text": tower.encode_text_tokens(ids, mask),  # (B, L, E)
            "text_mask": mask.bool(),  # (B, L): not a feature, no gradient
        }
    return {
        "image": tower.encode_image(batch["image"], ids_keep=keep),  # (B, E)
        "text": tower.encode_text(ids, mask),  # (B, E)
    }


def scalars(scale: torch.Tensor, bias: torch.Tensor | None) -> dict:
    """What every step logs next to the loss: the temperature's inverse and SigLIP's bias."""
    out = {"logit_scale": scale.detach().float()}
    if bias is not None:
        out["logit_bias"] = bias.detach().float()
    return out


def surrogate(feats: dict, cached: dict, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """sum_k <feats[k], grads[k]> (+ g_scale * scale + g_bias * bias when `cached` carries them: one chunk
    only). Its gradient w.r.t. every parameter is the cached loss's gradient through this chunk."""
    total = scale.new_zeros(())
    for key, grad in cached["grads"].items():
        f = feats[key]
        dtype = torch.promote_types(f.dtype, torch.float32)  # bf16 features: the product in fp32
        total = total + (f.to(dtype) * grad.to(f.device, dtype)).sum()
    if cached.get("scale") is not None:
        total = total + cached["scale"] * scale
    if cached.get("bias") is not None and bias is not None:
        total = total + cached["bias"] * bias
    return total


@register_objective("clip")
class Clip(Contrastive):
    """CLIP's symmetric InfoNCE over the global batch (Radford et al. 2021; ALIGN)."""

    Config = ClipConfig

    def __init__(self, backbone: nn.Module, cfg: ClipConfig):
        super().__init__(backbone, cfg, ClipLoss(local_loss=cfg.local_loss, chunk_size=cfg.chunk_size))

    def loss_of(self, feats, scale, bias):
        return self.loss_fn(feats["image"], feats["text"], scale, bias)


@register_objective("siglip")
class SigLip(Contrastive):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023); the two-tower needs a logit bias (init -10)."""

    Config = SigLipConfig

    def __init__(self, backbone: nn.Module, cfg: SigLipConfig):
        super().__init__(backbone, cfg, SigLipLoss(impl=cfg.impl, chunk_size=cfg.chunk_size))
        if backbone.logit_bias is None:
            raise ConfigError(
                "objective.name: 'siglip' needs a logit bias: set model.kwargs.init_logit_bias (SigLIP: -10, "
                "with init_logit_scale 2.3026 = ln 10)"
            )

    def loss_of(self, feats, scale, bias):
        return self.loss_fn(feats["image"], feats["text"], scale, bias)


@register_objective("filip")
class Filip(Contrastive):
    """FILIP's token-wise late interaction (Yao et al. 2022): each patch is matched to its most similar word
    and each word to its most similar patch; padding never matches."""

    Config = FilipConfig
    tokens = True

    def __init__(self, backbone: nn.Module, cfg: FilipConfig):
        super().__init__(backbone, cfg, FilipLoss(chunk_size=cfg.chunk_size))

    def loss_of(self, feats, scale, bias):
        return self.loss_fn(feats["image"], feats["text"], feats["text_mask"], scale)
