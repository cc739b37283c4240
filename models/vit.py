"""Vision Transformer (Dosovitskiy et al. 2021; DeiT sizes), the encoder MAE pretrains.

The backbone contract is in models/__init__.py. Here:
  forward_features(images, ids_keep=None, mask=None) -> tokens (B, P + L, D), final norm applied, P =
      num_prefix_tokens (1: the cls token; 0 with class_token=False; 2 with distill_token: cls, distillation)
  forward_intermediates(images, indices) -> list of (B, D, H/p, W/p) maps after the chosen blocks (default all)
`ids_keep` (B, K) selects which patch tokens enter the encoder (MAE's sparse encoding, FLIP's patch dropout);
the prefix tokens (if any) are always kept and come first.
stem_stride = patch_size: `mask` (B, H/p, W/p) bool, True = masked (SimMIM), replaces those patch embeddings by
the mask token (`mask_token=True`; zeros without one) before the position embedding is added and the cls token
prepended, as transformers' ViTEmbeddings does with `bool_masked_pos`. All L tokens still enter the encoder.

DeiT (Touvron et al. 2021), `distill_token=True` (needs the cls token and global_pool="token"): a learned
distillation token `dist_token` right after the cls token (tokens [cls, dist, patches], a position table of
2 + L rows; sin-cos gives both prefix rows zeros) and a second classifier `head_dist` on it.
forward_head(x) = (head(x[:, 0]) + head_dist(x[:, 1])) / 2, DeiT's inference output (pre_logits: the mean of
the two tokens, as timm's VisionTransformerDistilled); forward_head_distilled(x) -> (cls_logits, dist_logits)
for training against a teacher (transformers' DeiTForImageClassificationWithTeacher: cls_logits,
distillation_logits).

Options for the image towers of CLIP / SigLIP (defaults give the plain ViT above, bit for bit):
  pre_norm     a LayerNorm (`norm_pre`) on the embedded tokens before the blocks (CLIP's `pre_layrnorm`)
  class_token  False: no cls token (SigLIP); the position table is (1, L, D) and num_prefix_tokens 0
  global_pool  "token" (cls token), "avg" (mean of the patch tokens) or "map": attention pooling of all final
               tokens by a learned probe (`attn_pool`, SigLIP's multihead attention pooling head)
  patch_bias   False: the patch projection has no bias (CLIP)
  act          the MLP activation: "gelu" (erf), "gelu_tanh", "quick_gelu" (x * sigmoid(1.702 x), OpenAI CLIP)

Less work per step (models/token_reduce.py; off by default, and then bit-identical to the plain model):
  tome_r          ToMe: merge this many patch tokens in every block (bipartite soft matching, proportional
                  attention); forward_features then returns fewer tokens, (B, P + L - depth * r, D) at most
  evit_keep_rate  EViT: at the blocks `evit_locs` (default: those at 1/4, 1/2 and 3/4 of the depth, EViT's
                  4th, 7th and 10th of 12) keep this fraction of the patch tokens the cls token attends to most
                  and fuse the rest into one token
Both need the cls token pooled (global_pool="token"): the other pools would have to weigh merged tokens by their
sizes. They apply to forward_features with or without `ids_keep`; a `mask` (SimMIM needs every token back) and
forward_intermediates (a grid per block) refuse them, naming the switch.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.hierarchical import replace_masked
from models.layers import Block, Mlp, drop_path_rates, init_mae_weights, sincos_pos_embed_2d
from models.registry import register_sizes
from models.token_reduce import check_reduction, reduced_block

POOLS = ("token", "avg", "map")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): OpenAI CLIP's GELU approximation (transformers' "quick_gelu")."""
    return x * torch.sigmoid(1.702 * x)


# name -> function; transformers' hidden_act names: "gelu", "gelu_pytorch_tanh", "quick_gelu"
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "quick_gelu": quick_gelu}


def check_act(act: str) -> str:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    return act


class ActMlp(Mlp):
    """fc1 -> act -> fc2 with a chosen activation (models.layers.Mlp's parameters, which fixes the erf GELU)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__(dim, hidden)
        self.act = ACTIVATIONS[check_act(act)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AttentionPool(nn.Module):
    """Multihead attention pooling (Lee et al. 2019's PMA; SigLIP's MAP head, transformers'
    SiglipMultiheadAttentionPoolingHead, same parameter names): a learned probe attends over the tokens, then a
    residual MLP on its LayerNorm. (B, N, D) -> (B, D)."""

    def __init__(self, dim: int, num_heads: int, hidden: int, norm_eps: float, act: str = "gelu"):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = ActMlp(dim, hidden, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, D)
        probe = self.probe.to(x.dtype).expand(x.shape[0], -1, -1)  # (B, 1, D)
        h = self.attention(probe, x, x, need_weights=False)[0]  # (B, 1, D)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int, bias: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, L, D)
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"input is {tuple(x.shape[-2:])}, the model expects {self.img_size}x{self.img_size}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    fixed_input_size = True  # learned/fixed position embeddings for one grid: inputs must be img_size

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pos_embed: str = "learned",  # learned | sincos (fixed, as in MAE)
        global_pool: str = "token",  # token | avg | map
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        attn_backend: str = "auto",
        mask_token: bool = False,
        pre_norm: bool = False,
        class_token: bool = True,
        patch_bias: bool = True,
        act: str = "gelu",
        distill_token: bool = False,
        tome_r: int = 0,
        evit_keep_rate: float = 1.0,
        evit_locs: list[int] | None = None,
    ):
        super().__init__()
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError(
                "global_pool='token' pools the cls token: with class_token=False use 'avg' or 'map'"
            )
        if distill_token and not class_token:
            raise ValueError("distill_token=True needs class_token=True (DeiT: [cls, dist, patches])")
        if distill_token and global_pool != "token":
            raise ValueError(
                "distill_token=True classifies the cls and distillation tokens: global_pool must be "
                f"'token', got {global_pool!r}"
            )
        check_act(act)
        # None (the default) stays None in hparams: a rebuild at another depth gets that depth's default blocks
        self._evit_locs_given = None if evit_locs is None else sorted(set(evit_locs))
        if evit_locs is None:
            evit_locs = sorted({depth // 4, depth // 2, 3 * depth // 4})
        else:
            evit_locs = self._evit_locs_given
        check_reduction(tome_r, evit_keep_rate, tuple(evit_locs), depth)
        if (tome_r > 0 or evit_keep_rate < 1.0) and global_pool != "token":
            raise ValueError(
                f"tome_r / evit_keep_rate need global_pool='token' (the cls token pooled), got {global_pool!r}: "
                "averaged or attention-pooled tokens would have to be weighed by the patches each stands for"
            )
        self.tome_r, self.evit_keep_rate, self.evit_locs = tome_r, evit_keep_rate, evit_locs
        self.embed_dim = self.num_features = embed_dim
        self.in_chans, self.mlp_ratio, self.norm_eps = in_chans, mlp_ratio, norm_eps
        self.num_heads, self.qkv_bias, self.global_pool = num_heads, qkv_bias, global_pool
        self.pos_embed_type, self.patch_bias, self.act = pos_embed, patch_bias, act
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=patch_bias)
        self.patch_size, self.grid_size = patch_size, self.patch_embed.grid_size
        self.stem_stride = patch_size  # the grid a SimMIM `mask` is given at
        self.num_patches = self.patch_embed.num_patches
        self.num_prefix_tokens = int(class_token) + int(distill_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distill_token else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        n_pos = self.num_prefix_tokens + self.num_patches
        if pos_embed == "sincos":
            sincos = fixed_pos_embed(embed_dim, self.grid_size, self.num_prefix_tokens).unsqueeze(0)
            self.register_buffer("pos_embed", sincos, persistent=False)  # (1, P + L, D), fixed
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dim))
        dpr = drop_path_rates(drop_path_rate, depth)  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], norm_eps, attn_backend)
            for i in range(depth)
        )
        if act != "gelu":  # models.layers.Block's MLP is the erf GELU; same parameters, another activation
            for blk in self.blocks:
                blk.mlp = ActMlp(embed_dim, blk.mlp.fc1.out_features, act)
        # applied to every token after the position embedding (a LayerNorm cannot be set to the identity)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.attn_pool = (
            AttentionPool(embed_dim, num_heads, round(embed_dim * mlp_ratio), norm_eps, act)
            if global_pool == "map"
            else None
        )
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = None  # DeiT's classifier on the distillation token
        if distill_token:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)
        ]
        self.init_weights()

    def init_weights(self) -> None:
        self.apply(init_mae_weights)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer over the flattened patch
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)  # as DeiT / timm
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)  # as SimMIM (transformers' own init zeroes it)
        if self.attn_pool is not None:
            nn.init.trunc_normal_(self.attn_pool.probe, std=0.02)

    # --- contract -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        tokens = ("cls_token", "dist_token", "mask_token")
        names = {"pos_embed"} | {n for n in tokens if getattr(self, n) is not None}
        return names | ({"attn_pool.probe"} if self.attn_pool is not None else set())

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Regexes grouping parameters by depth (for layer-wise LR decay): stem, then one group per block."""
        return {
            "stem": r"^cls_token|^dist_token|^pos_embed|^patch_embed|^mask_token|^norm_pre",
            "blocks": r"^blocks\.(\d+)",
            "head": r"^norm\.|^head|^attn_pool",  # head and head_dist
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head (and distillation head, with distill_token) of `num_classes` outputs (0: Identity)."""
        self.head = self._new_head(num_classes)
        if self.dist_token is not None:
            self.head_dist = self._new_head(num_classes)

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.embed_dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    def embed(
        self, images: torch.Tensor, ids_keep: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Patch tokens + position embedding, optionally subset to `ids_keep` (MAE) or with the patches where
        `mask` (B, H/p, W/p) is True replaced by the mask token (SimMIM), with the prefix tokens (if any: cls,
        then dist) first, then the pre-norm (if any): (B, P + K, D), P = num_prefix_tokens."""
        if ids_keep is not None and mask is not None:
            raise ValueError(
                "pass ids_keep (MAE: encode a subset) or mask (SimMIM: replace patches), not both"
            )
        x = self.patch_embed(images)  # (B, L, D)
        if mask is not None:  # on the (B, H/p, W/p, D) patch grid, before the position embedding
            g = self.grid_size
            x = replace_masked(x.unflatten(1, (g, g)), mask, self.mask_token, "channels_last", "patch")
            x = x.flatten(1, 2)  # (B, L, D)
        pos = self.pos_embed.to(x.dtype)  # a fixed buffer stays fp32 when an engine casts parameters to bf16
        x = x + pos[:, self.num_prefix_tokens :]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)
        prefix = [t for t in (self.cls_token, self.dist_token) if t is not None]
        if prefix:
            tokens = torch.cat(prefix, dim=1) + pos[:, : self.num_prefix_tokens]  # (1, P, D)
            x = torch.cat([tokens.expand(x.shape[0], -1, -1), x], dim=1)
        return self.norm_pre(x)  # (B, P + K, D)

    @property
    def reduces_tokens(self) -> bool:
        """Whether ToMe (tome_r) or EViT (evit_keep_rate) drops tokens in the blocks."""
        return self.tome_r > 0 or self.evit_keep_rate < 1.0

    def _refuse_reduction(self, what: str) -> None:
        if self.reduces_tokens:
            switch = f"tome_r={self.tome_r}" if self.tome_r > 0 else f"evit_keep_rate={self.evit_keep_rate}"
            raise ValueError(
                f"{what} needs every patch token after each block: build the model with {switch} off"
            )

    def run_reduced_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks with ToMe merging / EViT pruning (models/token_reduce.py): (B, N, D) -> (B, N', D)."""
        size = x.new_ones(x.shape[0], x.shape[1], 1)  # (B, N, 1): patches each token stands for
        P = self.num_prefix_tokens
        for i, blk in enumerate(self.blocks):
            keep = self.evit_keep_rate if i in self.evit_locs else 1.0
            args = (blk, x, size, P, self.tome_r, keep)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, size = checkpoint(reduced_block, *args, use_reentrant=False)
            else:
                x, size = reduced_block(*args)
        return x

    def run_blocks(self, x: torch.Tensor, blocks=None) -> torch.Tensor:
        for blk in self.blocks if blocks is None else blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_features(
        self, images: torch.Tensor, ids_keep: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.reduces_tokens:
            if mask is not None:
                self._refuse_reduction("a SimMIM `mask`")
            return self.norm(self.run_reduced_blocks(self.embed(images, ids_keep)))  # (B, P + K', D), K' <= K
        return self.norm(self.run_blocks(self.embed(images, ids_keep, mask)))  # (B, P + K, D)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.dist_token is not None:  # DeiT: both tokens, each with its own head, averaged
            if pre_logits:
                return (x[:, 0] + x[:, 1]) / 2  # (B, D)
            cls_logits, dist_logits = self.forward_head_distilled(x)
            return (cls_logits + dist_logits) / 2  # (B, num_classes)
        if self.global_pool == "token":
            x = x[:, 0]  # (B, D)
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)  # (B, D)
        else:
            x = self.attn_pool(x)  # (B, D): the probe attends over every final token
        return x if pre_logits else self.head(x)

    def forward_head_distilled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DeiT's two outputs from the final tokens (B, 2 + L, D): (head(cls token), head_dist(distillation
        token)), each (B, num_classes) ((B, D) without a classifier). The first is trained on the labels, the
        second on the teacher's; forward_head is their mean."""
        if self.dist_token is None:
            raise ValueError("forward_head_distilled needs a model built with distill_token=True")
        return self.head(x[:, 0]), self.head_dist(x[:, 1])

    def forward_intermediates(
        self, images: torch.Tensor, indices: list[int] | None = None
    ) -> list[torch.Tensor]:
        """Spatial maps (B, D, H/p, W/p) after the blocks in `indices` (default: every block)."""
        self._refuse_reduction("forward_intermediates")
        n = len(self.blocks)
        indices = list(range(n)) if indices is None else [i % n for i in indices]
        x, out = self.embed(images), []
        for i, blk in enumerate(self.blocks):
            x = self.run_blocks(x, [blk])
            if i in indices:
                tokens = x[:, self.num_prefix_tokens :]  # (B, L, D)
                out.append(tokens.transpose(1, 2).reshape(x.shape[0], -1, self.grid_size, self.grid_size))
            if i >= max(indices):
                break
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def hparams(self) -> dict:
        """Constructor arguments that rebuild this architecture (for checkpoints and export)."""
        return dict(
            img_size=self.patch_embed.img_size,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            embed_dim=self.embed_dim,
            depth=len(self.blocks),
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            pos_embed=self.pos_embed_type,
            global_pool=self.global_pool,
            num_classes=self.head.out_features if isinstance(self.head, nn.Linear) else 0,
            norm_eps=self.norm_eps,
            mask_token=self.mask_token is not None,
            pre_norm=isinstance(self.norm_pre, nn.LayerNorm),
            class_token=self.cls_token is not None,
            patch_bias=self.patch_bias,
            act=self.act,
            distill_token=self.dist_token is not None,
            tome_r=self.tome_r,
            evit_keep_rate=self.evit_keep_rate,
            evit_locs=self._evit_locs_given,
        )


def fixed_pos_embed(dim: int, grid: int, num_prefix_tokens: int) -> torch.Tensor:
    """The sin-cos table (P + grid*grid, dim) of a ViT with P prefix tokens: a zero row for each (as MAE's cls
    row)."""
    table = sincos_pos_embed_2d(dim, grid, cls_token=False)  # (grid*grid, dim)
    return torch.cat([table.new_zeros(num_prefix_tokens, dim), table], dim=0)


# name: (patch, dim, depth, heads). `test` is CI-sized, `mini` trains on a CPU in minutes (the README demo);
# the rest are the DeiT/ViT paper sizes.
_SIZES = {
    "vit_test_patch4": (4, 32, 2, 2),
    "vit_mini_patch4": (4, 128, 4, 4),
    "vit_tiny_patch16": (16, 192, 12, 3),
    "vit_small_patch16": (16, 384, 12, 6),
    "vit_base_patch16": (16, 768, 12, 12),
    "vit_large_patch16": (16, 1024, 24, 16),
    "vit_huge_patch14": (14, 1280, 32, 16),
}
register_sizes(
    VisionTransformer,
    {
        name: dict(img_size=32 if p == 4 else 224, patch_size=p, embed_dim=dim, depth=depth, num_heads=heads)
        for name, (p, dim, depth, heads) in _SIZES.items()
    },
    smoke=dict(img_size=32, patch_size=8, depth=2),  # CPU-test size (see models/__init__.py)
)
# DeiT with its distillation token (the paper's distilled models; `deit_test` is CI-sized):
# name: (img, patch, dim, depth, heads)
_DEIT_SIZES = {
    "deit_test": (32, 4, 32, 2, 2),
    "deit_tiny_patch16_224": (224, 16, 192, 12, 3),
    "deit_small_patch16_224": (224, 16, 384, 12, 6),
}
register_sizes(
    VisionTransformer,
    {
        name: dict(
            img_size=img, patch_size=p, embed_dim=dim, depth=depth, num_heads=heads, distill_token=True
        )
        for name, (img, p, dim, depth, heads) in _DEIT_SIZES.items()
    },
    smoke=dict(img_size=32, patch_size=8, depth=2),
)
