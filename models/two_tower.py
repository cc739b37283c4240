"""A two-tower image-text model (CLIP, Radford et al. 2021; ALIGN; SigLIP, Zhai et al. 2023; FILIP's token
features): any registered image backbone and any registered text model, each followed by a projection into one
embedding space, and a learned temperature (`logit_scale`) and, for SigLIP, a learned bias (`logit_bias`).

  encode_image(images, ids_keep=None)        -> (B, E)     the image tower's pooled features, projected
  encode_image_tokens(images, ids_keep=None) -> (B, n, E)  its final-normed patch tokens, projected per token
  encode_text(input_ids, attention_mask)     -> (B, E)     the text tower's pooled token, projected
  encode_text_tokens(input_ids, ...)         -> (B, L, E)  every text token, projected
  scale_and_bias()                           -> (exp(clamp(logit_scale, 0, ln 100)), logit_bias or None)
Embeddings are L2-normalized unless normalize=False. The losses (pretrain/objectives/contrastive_loss.py) take
these; nothing here knows about ranks.

Pooling. Image: the tower's own forward_head(pre_logits=True) ("default": ViT cls token / mean / MAP head,
the hierarchical towers' pooled features). Text ("default" picks by tower): "eos" the first position holding
eos_token_id (CLIP: with a causal tower every earlier token reaches it and no later one, so trailing padding
cannot change it), "last" the last position (SigLIP), "first" position 0 (a CLS token: ModernBERT), "mean" the
mean over attention_mask's real tokens. Text towers run on whole rows without an attention mask: a causal tower
needs none before its end-of-text token, and SigLIP attends to the padding, as its paper and SiglipModel
without an attention_mask do.

The layout maps onto transformers' classes (the export, pretrain/export.py): ViT (pre_norm, no patch bias) +
TextTransformer (causal) + bias-free projections = CLIPModel; ViT (no cls token, MAP head) + TextTransformer
(bidirectional) with image_proj "none" and a text projection with bias = SiglipModel.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from models.registry import MODELS, register_sizes

TEXT_POOLS = ("default", "eos", "last", "first", "mean")
IMAGE_POOLS = ("default",)
IMAGE_PROJS = ("linear", "none")
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP's clamp: the temperature never goes below 0.01


def _modality(name: str) -> str:
    return getattr(MODELS.get(name).builds, "modality", "image")


def _prefixed(pattern: str, prefix: str) -> str:
    """A group_matcher regex of a tower, made to match the tower's parameters under `prefix` ("visual.")."""
    body = re.sub(r"(?<!\[)\^", "", pattern)  # the anchors go: the prefix anchors the whole alternation
    return f"^{re.escape(prefix)}(?:{body})"


def _blocks(matcher: dict, prefix: str, tower: int) -> list[tuple[str, tuple]]:
    """A tower's block regexes as (pattern, suffix) under `prefix`; the trailing `tower` index keeps the image
    tower's depth groups apart from the text tower's (pretrain.optim.layer_ids orders the captured tuples)."""
    blocks = matcher["blocks"]
    entries = blocks if isinstance(blocks, list) else [(blocks, None)]
    return [(_prefixed(p, prefix), (*(suffix or ()), tower)) for p, suffix in entries]


class TwoTower(nn.Module):
    modality = "image_text"

    def __init__(
        self,
        image_tower: str = "vit_base_patch16",
        image_kwargs: dict | None = None,
        text_tower: str = "clip_text_base",
        text_kwargs: dict | None = None,
        embed_dim: int = 512,
        image_pool: str = "default",
        text_pool: str = "default",
        image_proj: str = "linear",
        text_proj_bias: bool = False,
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: float | None = None,
        img_size: int = 224,
        in_chans: int = 3,
        vocab_size: int = 49408,
        context_length: int = 77,
        eos_token_id: int | None = 49407,
        pad_token_id: int | None = None,
    ):
        super().__init__()
        image_kwargs, text_kwargs = dict(image_kwargs or {}), dict(text_kwargs or {})
        self._check_names(image_tower, text_tower)
        for where, kw, owned in (
            ("image_kwargs", image_kwargs, ("img_size", "in_chans")),
            ("text_kwargs", text_kwargs, ("vocab_size", "max_seq_len")),
        ):
            for key in owned:
                if key in kw:
                    mine = "context_length" if key == "max_seq_len" else key
                    raise ValueError(f"{where}.{key}: set the two-tower's own {mine!r} (the data decides it)")
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        if image_pool not in IMAGE_POOLS:
            raise ValueError(f"image_pool must be one of {IMAGE_POOLS}, got {image_pool!r}")
        if text_pool not in TEXT_POOLS:
            raise ValueError(f"text_pool must be one of {TEXT_POOLS}, got {text_pool!r}")
        if image_proj not in IMAGE_PROJS:
            raise ValueError(f"image_proj must be one of {IMAGE_PROJS}, got {image_proj!r}")
        if pad_token_id is not None and not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id={pad_token_id} is not a token of vocab_size {vocab_size}")
        self.image_tower, self.text_tower = image_tower, text_tower
        self.embed_dim, self.image_pool, self.image_proj_kind = embed_dim, image_pool, image_proj
        self.text_proj_bias, self.init_logit_scale = text_proj_bias, float(init_logit_scale)
        self.init_logit_bias = None if init_logit_bias is None else float(init_logit_bias)
        self.img_size, self.in_chans, self.vocab_size = img_size, in_chans, vocab_size
        self.context_length, self.eos_token_id, self.pad_token_id = context_length, eos_token_id, pad_token_id
        self._image_kwargs, self._text_kwargs = image_kwargs, text_kwargs

        self.visual = models.create_model(image_tower, img_size=img_size, in_chans=in_chans, **image_kwargs)
        self.text = models.create_model(
            text_tower, vocab_size=vocab_size, max_seq_len=context_length, **text_kwargs
        )
        self.text_pool = self._resolve_text_pool(text_pool)
        self._text_pool_arg = text_pool
        width = self.visual.num_features
        if image_proj == "none":
            if width != embed_dim:
                raise ValueError(
                    f"image_proj='none' uses the image tower's pooled features as the embedding: "
                    f"{image_tower!r} is {width} wide but embed_dim is {embed_dim} (set them equal, or "
                    "image_proj='linear')"
                )
            self.image_proj = nn.Identity()
        else:
            self.image_proj = nn.Linear(width, embed_dim, bias=False)  # CLIP's visual_projection
        self.text_proj = nn.Linear(self.text.num_features, embed_dim, bias=text_proj_bias)
        # (1,), not 0-d: DeepSpeed cannot broadcast or partition 0-d parameters (as HF's SiglipModel stores them)
        self.logit_scale = nn.Parameter(torch.tensor([self.init_logit_scale]))  # (1,)
        self.logit_bias = (
            None if init_logit_bias is None else nn.Parameter(torch.tensor([self.init_logit_bias]))
        )
        self.num_features = embed_dim
        self.init_weights()

    @staticmethod
    def _check_names(image_tower: str, text_tower: str) -> None:
        for key, name, want in (("image_tower", image_tower, "image"), ("text_tower", text_tower, "text")):
            try:
                got = _modality(name)
            except KeyError as err:
                raise ValueError(f"{key}: {err.args[0]}") from None
            if got != want:
                raise ValueError(
                    f"{key}={name!r} is a registered {got} model; the {key.split('_')[0]} tower must be an "
                    f"{want} model (models.list_models())"
                )

    def _resolve_text_pool(self, pool: str) -> str:
        if pool == "default":
            pool = getattr(self.text, "default_pool", None) or ("eos" if self.text.causal else "first")
        if pool == "eos" and self.eos_token_id is None:
            raise ValueError(
                f"text_pool='eos' (the default for the causal text tower {self.text_tower!r}) needs eos_token_id"
            )
        return pool

    def init_weights(self) -> None:
        """The projections as open_clip's: N(0, width^-0.5), bias zero. The towers init themselves."""
        for proj in (self.image_proj, self.text_proj):
            if isinstance(proj, nn.Linear):
                nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)

    # --- encoders -------------------------------------------------------------------------------
    def _image_features(self, images: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        if ids_keep is None:
            return self.visual.forward_features(images)
        if not hasattr(self.visual, "num_prefix_tokens"):
            raise ValueError(
                f"ids_keep (patch dropout) needs a ViT image tower; image_tower {self.image_tower!r} is a "
                f"{type(self.visual).__name__}"
            )
        return self.visual.forward_features(images, ids_keep=ids_keep)

    def encode_image(
        self, images: torch.Tensor, ids_keep: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """images (B, C, S, S) -> (B, E); `ids_keep` (B, K): the patches a ViT tower encodes (FLIP)."""
        pooled = self.visual.forward_head(self._image_features(images, ids_keep), pre_logits=True)  # (B, D)
        x = self.image_proj(pooled)  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image_tokens(
        self, images: torch.Tensor, ids_keep: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """images (B, C, S, S) -> (B, n, E): ViT the final-normed patch tokens (no prefix tokens); a hierarchical
        tower its last map after its final norm, flattened row-major. Projected per token."""
        x = self.image_tokens(self._image_features(images, ids_keep))  # (B, n, D)
        x = self.image_proj(x)  # (B, n, E)
        return F.normalize(x, dim=-1) if normalize else x

    def image_tokens(self, feats: torch.Tensor) -> torch.Tensor:
        """The image tower's forward_features -> (B, n, D) tokens after its final norm (models/__init__.py says
        where each family's norm sits: in forward_features for token layouts and PVT v2, in forward_head for
        ConvNeXt, PoolFormer and MaxViT, which norm their maps per position here)."""
        if feats.ndim == 3:  # (B, P + n, D): ViT (prefix tokens dropped), Swin
            return feats[:, getattr(self.visual, "num_prefix_tokens", 0) :]
        if feats.ndim != 4:
            raise ValueError(
                f"image tower {type(self.visual).__name__}: features of shape {tuple(feats.shape)} are not "
                "per-token (expected (B, N, D) or a map), so token-wise objectives (filip) cannot use this family"
            )
        norm = getattr(self.visual, "norm", None)
        if isinstance(norm, nn.GroupNorm):  # PoolFormer: normalizes the whole map
            feats = norm(feats)
        x = feats.flatten(2).transpose(1, 2)  # (B, h*w, C)
        if isinstance(norm, nn.LayerNorm):  # ConvNeXt, MaxViT: the head's LayerNorm, per position
            x = norm(x)
        return x

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """input_ids (B, L) -> (B, E), pooled as `text_pool` says; attention_mask (B, L) (1 = real token) is
        read by "mean" pooling only."""
        hidden = self.text.forward_features(input_ids)  # (B, L, D)
        x = self.text_proj(self.pool_text(hidden, input_ids, attention_mask))  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """input_ids (B, L) -> (B, L, E): every position's final hidden state, projected (FILIP; the loss masks
        the padding with attention_mask)."""
        x = self.text_proj(self.text.forward_features(input_ids))  # (B, L, E)
        return F.normalize(x, dim=-1) if normalize else x

    def pool_text(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L, D) -> (B, D) at the pooling position(s)."""
        if self.text_pool == "last":
            return hidden[:, -1]
        if self.text_pool == "first":
            return hidden[:, 0]
        if self.text_pool == "mean":
            if attention_mask is None:
                return hidden.mean(dim=1)
            m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        is_eos = input_ids == self.eos_token_id  # (B, L)
        if input_ids.device.type != "meta" and not bool(is_eos.any(dim=1).all()):  # meta: FLOP counts
            rows = (~is_eos.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(
                f"text_pool='eos': rows {rows} hold no eos_token_id {self.eos_token_id} (captions must end with "
                "the tokenizer's end-of-text token, kept when truncating)"
            )
        first = is_eos.int().argmax(dim=1)  # (B,) argmax returns the first maximum
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]

    def scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(exp of the raw logit_scale clamped to [0, ln 100], logit_bias or None). The clamp is functional (no
        in-place write), so it also holds under ZeRO-3 partitioning and between optimizer steps."""
        scale = self.logit_scale[0].clamp(0.0, LOGIT_SCALE_MAX).exp()  # ()
        # ln 100 rounds up in fp32 (exp gives 100.0000076): cap the value at exactly 100 without touching the
        # gradient, which clamp passes at the bound (so a scale at its maximum can still come down)
        scale = scale - (scale - scale.clamp(max=100.0)).detach()
        return scale, None if self.logit_bias is None else self.logit_bias[0]

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embeddings (B, E), text embeddings (B, E)), both L2-normalized."""
        return self.encode_image(images), self.encode_text(input_ids)

    # --- contract -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        names = {"logit_scale"} | ({"logit_bias"} if self.logit_bias is not None else set())
        names |= {f"visual.{n}" for n in self.visual.no_weight_decay()}
        return names | {f"text.{n}" for n in self.text.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer-wise LR decay groups: stem = both towers' stems, then both towers' blocks (image and text block
        i are distinct groups, ordered by depth), head = the towers' heads (final norms, MAP), the projections,
        the scale and the bias."""
        gm = {"visual.": self.visual.group_matcher(coarse), "text.": self.text.group_matcher(coarse)}
        return {
            "stem": "|".join(_prefixed(m["stem"], p) for p, m in gm.items()),
            "blocks": [*_blocks(gm["visual."], "visual.", 0), *_blocks(gm["text."], "text.", 1)],
            "head": "|".join(
                [*(_prefixed(m["head"], p) for p, m in gm.items()), r"^image_proj\.|^text_proj\.|^logit_"]
            ),
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def hparams(self) -> dict:
        """Constructor arguments that rebuild this model; the towers' kwargs hold their full architecture (their
        own hparams() over the kwargs given), so a checkpoint does not depend on the registry's size tables."""
        data = ("img_size", "in_chans", "vocab_size", "max_seq_len")
        image_kwargs = {**self._image_kwargs, **self.visual.hparams()}
        text_kwargs = {**self._text_kwargs, **self.text.hparams()}
        return dict(
            image_tower=self.image_tower,
            image_kwargs={k: v for k, v in image_kwargs.items() if k not in data},
            text_tower=self.text_tower,
            text_kwargs={k: v for k, v in text_kwargs.items() if k not in data},
            embed_dim=self.embed_dim,
            image_pool=self.image_pool,
            text_pool=self._text_pool_arg,
            image_proj=self.image_proj_kind,
            text_proj_bias=self.text_proj_bias,
            init_logit_scale=self.init_logit_scale,
            init_logit_bias=self.init_logit_bias,
            img_size=self.img_size,
            in_chans=self.in_chans,
            vocab_size=self.vocab_size,
            context_length=self.context_length,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )


# Sizes. CLIP: a pre-norm ViT without patch bias + the causal text transformer, bias-free projections, logit scale
# ln(1/0.07). SigLIP: a ViT without cls token pooled by a MAP head (its output is the embedding) + the
# bidirectional text transformer with a biased projection, logit scale ln 10 and bias -10 (the paper's init).
_CLIP_VIT = dict(pre_norm=True, patch_bias=False, norm_eps=1e-5)
_SIGLIP_VIT = dict(class_token=False, global_pool="map", norm_eps=1e-6)
_SIGLIP = dict(image_proj="none", text_proj_bias=True, init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
_SIZES = {
    "clip_test": dict(
        image_tower="vit_test_patch4",
        image_kwargs=_CLIP_VIT,
        text_tower="clip_text_test",
        embed_dim=32,
        img_size=32,
        vocab_size=512,
        eos_token_id=511,
    ),
    "clip_mini": dict(
        image_tower="vit_mini_patch4",
        image_kwargs=_CLIP_VIT,
        text_tower="clip_text_mini",
        embed_dim=128,
        img_size=32,
    ),
    "clip_vit_b16": dict(
        image_tower="vit_base_patch16", image_kwargs=_CLIP_VIT, text_tower="clip_text_base", embed_dim=512
    ),
    "siglip_test": dict(
        image_tower="vit_test_patch4",
        image_kwargs=_SIGLIP_VIT,
        text_tower="siglip_text_test",
        embed_dim=32,
        img_size=32,
        vocab_size=512,
        context_length=64,
        eos_token_id=None,
        **_SIGLIP,
    ),
    "siglip_vit_b16": dict(
        image_tower="vit_base_patch16",
        image_kwargs=_SIGLIP_VIT,
        text_tower="siglip_text_base",
        embed_dim=768,
        vocab_size=32000,
        context_length=64,
        eos_token_id=1,
        **_SIGLIP,
    ),
}
for _name, _defaults in _SIZES.items():
    # the smoke size (models/__init__.py): two blocks per tower, a 32-pixel input, a small vocabulary and context;
    # widths and heads unchanged. Per size: it keeps that size's tower options.
    register_sizes(
        TwoTower,
        {_name: _defaults},
        smoke=dict(
            image_kwargs={**_defaults["image_kwargs"], "depth": 2, "patch_size": 8},
            text_kwargs={"depth": 2},
            img_size=32,
            vocab_size=1000,
            context_length=16,
            eos_token_id=None if _defaults.get("eos_token_id", 49407) is None else 999,
        ),
    )
