"""CrossViT (Chen et al. 2021, "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification").

Two ViT branches see the image at two patch sizes: branch 0 (S, small patches: fine tokens, the narrower width
D0) and branch 1 (L, large patches: coarse tokens, width D1). Each branch has its own patch embedding, cls token and
learned position table; the input of a branch whose size `int(img_scale[b] * img_size)` differs from the image's
is the image resized to it (bicubic, align_corners=False, no antialias: timm's `scale_image`, e.g. 240 -> 224 for
the large branch of the `*_240` models; an input of another size than img_size is resized for both branches).
`depth` lists the multi-scale blocks as [d0, d1] pairs: d0 transformer blocks on branch 0 and d1 on branch 1,
then one cross-attention fusion per branch (the paper's best variant; timm's `depth[-1] == 0` layout, which every
released model uses). Fusion of branch b with the other branch o (paper eqs. 5-7, CrossAttentionFusion):

    x' = f(cls_b)                        f: LayerNorm -> GELU -> Linear, D_b -> D_o
    z = [x', patches_o]                  (B, 1 + N_o, D_o)
    y = x' + CA(LN(z))                   the cls token alone is the query; keys and values are all of z
    cls_b <- g(y)                        g: LayerNorm -> GELU -> Linear, D_o -> D_b; the patches of b are unchanged
Both fusions of a block read the tokens as the branch blocks left them (a fusion changes only its cls token
and reads only the other branch's patches, so their order does not matter). The classifier averages the two branches'
logits (each on its final-normed cls token, or on the mean of its patch tokens with global_pool="avg").

The backbone contract (models/__init__.py) for two branches of different widths and grids:
  forward_features(images) -> (B, T): both branches' final-normed tokens, flattened and concatenated: T =
      (1 + N0) * D0 + (1 + N1) * D1 (one tensor, as the contract asks; timm returns the list of the two).
      `split_features(feats)` -> [(B, 1 + N0, D0), (B, 1 + N1, D1)] (cls token first) gives timm's list back.
  forward_head(feats, pre_logits=False) -> the mean of the two branch classifiers' logits, or (pre_logits, or
      num_classes=0) both pooled tokens concatenated (B, D0 + D1) = num_features
  forward_intermediates(images, indices) / feature_info: the patch tokens (cls dropped, before the final norm) of
      each branch after each multi-scale block, as (B, D_b, G_b, G_b), branch-major as timm: index b * n + i is
      branch b after block i (n blocks): reductions 12 then 17 for the *_240 models. The large branch's reduction
      is timm's round(patch / img_scale): its 14 x 14 grid covers 240 px at 240 / 14 = 17.1 px a token.
  fixed_input_size = True: the grids and position tables are fixed by img_size and img_scale.
No stem mask (SimMIM's `mask`): the two branches tokenize the image on grids that share no cell (12 px cells of the
240 image and 16 px cells of its 224 resize, 240 / 14 px of the original: a common refinement only at 120 px),
so one (B, H/s, W/s) mask cannot say which tokens of both branches to hide. Nor MAE's `ids_keep`, for the same
reason. `stem_mask` (the class attribute) holds this reason.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hierarchical import run_block, run_blocks
from models.layers import Block, drop_path, drop_path_rates
from models.registry import register_sizes
from models.vit import PatchEmbed
from ops import attention

POOLS = ("token", "avg")


class Projection(nn.Module):
    """LayerNorm -> GELU -> Linear: the fusion's f (cls token into the other branch's width) and g (back)."""

    def __init__(self, dim: int, out_dim: int, norm_eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.fc = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, dim) -> (B, N, out_dim)
        return self.fc(F.gelu(self.norm(x)))


class CrossAttention(nn.Module):
    """The first token (the cls token) is the only query; keys and values are every token (paper eq. 5)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, 1, C)
        B, N, C = z.shape
        q = self.q(z[:, :1]).view(B, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, 1, hd)
        k = self.k(z).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, hd)
        v = self.v(z).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, hd)
        x = attention(q, k, v, backend=self.backend)  # (B, h, 1, hd)
        return self.proj(x.transpose(1, 2).reshape(B, 1, C))


class CrossAttentionFusion(nn.Module):
    """Branch b's cls token visits the other branch: f, cross-attention over [f(cls_b), patches_o], g (module
    docstring). (B, 1 + N_b, D_b), (B, 1 + N_o, D_o) -> (B, 1 + N_b, D_b)."""

    def __init__(
        self,
        dim: int,
        other_dim: int,
        other_heads: int,
        qkv_bias: bool,
        drop_path: float,
        norm_eps: float,
        backend: str = "auto",
    ):
        super().__init__()
        self.proj = Projection(dim, other_dim, norm_eps)  # f
        self.norm = nn.LayerNorm(other_dim, eps=norm_eps)
        self.attn = CrossAttention(other_dim, other_heads, qkv_bias, backend)
        self.revert = Projection(other_dim, dim, norm_eps)  # g
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        cls = self.proj(x[:, :1])  # (B, 1, D_o)
        z = torch.cat([cls, other[:, 1:]], dim=1)  # (B, 1 + N_o, D_o)
        cls = cls + drop_path(self.attn(self.norm(z)), self.drop_path, self.training)  # (B, 1, D_o)
        return torch.cat([self.revert(cls), x[:, 1:]], dim=1)  # (B, 1 + N_b, D_b)


class MultiScaleBlock(nn.Module):
    """depths[b] transformer blocks on each branch, then the two fusions (each reads both branches' block outputs).
    `dpr`: the stochastic-depth rates of this block's max(depths) steps; the fusions take the last (as timm)."""

    def __init__(self, dims, depths, heads, mlp_ratios, qkv_bias, dpr, norm_eps, backend="auto"):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.ModuleList(
                Block(dims[b], heads[b], mlp_ratios[b], qkv_bias, dpr[j], norm_eps, backend)
                for j in range(depths[b])
            )
            for b in range(2)
        )
        self.fusion = nn.ModuleList(
            CrossAttentionFusion(dims[b], dims[1 - b], heads[1 - b], qkv_bias, dpr[-1], norm_eps, backend)
            for b in range(2)
        )
        self.grad_checkpointing = False

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:  # [(B, 1 + N_b, D_b)] -> same
        xs = [run_blocks(self, blocks, x) for blocks, x in zip(self.branches, xs)]
        return [run_block(self, fuse, xs[b], xs[1 - b]) for b, fuse in enumerate(self.fusion)]


class CrossViT(nn.Module):
    fixed_input_size = True  # one learned position table per branch, for its fixed grid
    stem_mask = (  # why forward_features takes no `mask` (module docstring)
        "the two branches tokenize the image on different grids (patch sizes and, with img_scale, image sizes): "
        "no one stem grid masks the tokens of both"
    )

    def __init__(
        self,
        img_size: int = 240,
        img_scale: tuple[float, ...] = (1.0, 224 / 240),
        patch_size: tuple[int, ...] = (12, 16),
        in_chans: int = 3,
        embed_dim: tuple[int, ...] = (96, 192),
        depth: tuple[tuple[int, ...], ...] = ((1, 4), (1, 4), (1, 4)),
        num_heads: tuple[int, ...] = (3, 3),
        mlp_ratio: tuple[float, ...] = (4.0, 4.0),
        qkv_bias: bool = True,
        global_pool: str = "token",
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        attn_backend: str = "auto",
    ):
        super().__init__()
        for name, v in dict(
            img_scale=img_scale,
            patch_size=patch_size,
            embed_dim=embed_dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
        ).items():
            if len(v) != 2:
                raise ValueError(f"{name} needs one entry per branch (2: small, large patches), got {v!r}")
        if not depth or any(len(d) != 2 or min(d) < 1 for d in depth):
            raise ValueError(
                f"depth lists the multi-scale blocks as [d0, d1] pairs, each >= 1, got {depth!r}"
            )
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.img_size, self.in_chans, self.global_pool, self.norm_eps = (
            img_size,
            in_chans,
            global_pool,
            norm_eps,
        )
        self.img_scale, self.patch_size = [float(s) for s in img_scale], [int(p) for p in patch_size]
        self.embed_dim, self.num_heads = [int(d) for d in embed_dim], [int(h) for h in num_heads]
        self.depth, self.mlp_ratio = [[int(a), int(b)] for a, b in depth], [float(r) for r in mlp_ratio]
        self.qkv_bias = qkv_bias
        self.branch_sizes = [int(s * img_size) for s in self.img_scale]  # as timm: truncated
        self.patch_embed = nn.ModuleList(
            PatchEmbed(size, p, in_chans, d)
            for size, p, d in zip(self.branch_sizes, self.patch_size, embed_dim)
        )
        self.grid_sizes = [pe.grid_size for pe in self.patch_embed]
        self.cls_token = nn.ParameterList(nn.Parameter(torch.zeros(1, 1, d)) for d in embed_dim)
        self.pos_embed = nn.ParameterList(
            nn.Parameter(torch.zeros(1, 1 + pe.num_patches, d)) for pe, d in zip(self.patch_embed, embed_dim)
        )
        steps = [max(d) for d in self.depth]  # stochastic depth grows over max(d0, d1) steps per block
        dpr = drop_path_rates(drop_path_rate, sum(steps))
        starts = [sum(steps[:i]) for i in range(len(steps))]
        self.blocks = nn.ModuleList(
            MultiScaleBlock(
                embed_dim, d, num_heads, mlp_ratio, qkv_bias, dpr[s : s + n], norm_eps, attn_backend
            )
            for d, s, n in zip(self.depth, starts, steps)
        )
        self.norm = nn.ModuleList(nn.LayerNorm(d, eps=norm_eps) for d in embed_dim)
        self.num_features = sum(embed_dim)
        self.head = self._new_head(num_classes)
        self.feature_info = [  # branch-major, as timm: index b * len(blocks) + i
            dict(num_chs=d, reduction=round(p / s), module=f"blocks.{i}")
            for d, p, s in zip(self.embed_dim, self.patch_size, self.img_scale)
            for i in range(len(self.blocks))
        ]
        self.init_weights()

    def init_weights(self) -> None:
        """As the paper's code (DeiT's): truncated-normal(0.02) linears, tokens and position tables; zero biases;
        unit LayerNorms; the patch convolutions keep PyTorch's default."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in [*self.cls_token, *self.pos_embed]:
            nn.init.trunc_normal_(p, std=0.02)

    def _new_head(self, num_classes: int) -> nn.ModuleList:
        heads = nn.ModuleList(
            nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity() for d in self.embed_dim
        )
        for h in heads:
            if isinstance(h, nn.Linear):
                nn.init.trunc_normal_(h.weight, std=0.02)
                nn.init.zeros_(h.bias)
        return heads

    # --- contract -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {f"{n}.{b}" for n in ("cls_token", "pos_embed") for b in range(2)}

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Regexes grouping parameters by depth (layer-wise LR decay): stem, one group per multi-scale block, head."""
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": r"^blocks\.(\d+)",
            "head": r"^norm\.|^head\.",
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every transformer block and every fusion."""
        for blk in self.blocks:
            blk.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.head = self._new_head(num_classes)

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, C, H, W) -> [(B, 1 + N_b, D_b)]: each branch's (resized) image as patch tokens, its cls token
        first, plus its position table."""
        xs = []
        for b, pe in enumerate(self.patch_embed):
            size = self.branch_sizes[b]
            x = images
            if x.shape[-2:] != (size, size):  # timm's scale_image (crop_scale=False)
                x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
            x = pe(x)  # (B, N_b, D_b)
            cls = self.cls_token[b].to(x.dtype).expand(x.shape[0], -1, -1)  # (B, 1, D_b)
            xs.append(torch.cat([cls, x], dim=1) + self.pos_embed[b].to(x.dtype))  # (B, 1 + N_b, D_b)
        return xs

    def split_features(self, feats: torch.Tensor) -> list[torch.Tensor]:
        """forward_features' (B, T) -> [(B, 1 + N0, D0), (B, 1 + N1, D1)], each branch's tokens, cls first."""
        shapes = [(1 + g * g, d) for g, d in zip(self.grid_sizes, self.embed_dim)]
        parts = feats.split([n * d for n, d in shapes], dim=1)
        return [p.view(feats.shape[0], n, d) for p, (n, d) in zip(parts, shapes)]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Both branches' final-normed tokens, flattened and concatenated: (B, (1 + N0) D0 + (1 + N1) D1)."""
        xs = self.embed(images)
        for blk in self.blocks:
            xs = blk(xs)
        return torch.cat([norm(x).flatten(1) for norm, x in zip(self.norm, xs)], dim=1)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        xs = self.split_features(feats)
        pooled = [x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0] for x in xs]  # [(B, D_b)]
        if pre_logits or not isinstance(self.head[0], nn.Linear):
            return torch.cat(pooled, dim=1)  # (B, D0 + D1)
        return torch.stack([h(p) for h, p in zip(self.head, pooled)]).mean(dim=0)  # (B, num_classes)

    def forward_intermediates(
        self, images: torch.Tensor, indices: list[int] | None = None
    ) -> list[torch.Tensor]:
        """Patch tokens of branch b after block i as (B, D_b, G_b, G_b), at index b * n + i (module docstring);
        only the blocks up to the deepest one asked for run."""
        n = len(self.blocks)
        order = list(range(2 * n)) if indices is None else [i % (2 * n) for i in indices]
        xs, out = self.embed(images), {}
        for i in range(max(j % n for j in order) + 1):
            xs = self.blocks[i](xs)
            for b, x in enumerate(xs):
                if b * n + i in order:
                    g = self.grid_sizes[b]
                    out[b * n + i] = x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, g, g)  # (B, D_b, G, G)
        return [out[j] for j in order]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def hparams(self) -> dict:
        """Constructor arguments that rebuild this architecture (plain lists: checkpoints' YAML holds them)."""
        return dict(
            img_size=self.img_size,
            img_scale=list(self.img_scale),
            patch_size=list(self.patch_size),
            in_chans=self.in_chans,
            embed_dim=list(self.embed_dim),
            depth=[list(d) for d in self.depth],
            num_heads=list(self.num_heads),
            mlp_ratio=list(self.mlp_ratio),
            qkv_bias=self.qkv_bias,
            global_pool=self.global_pool,
            num_classes=self.head[0].out_features if isinstance(self.head[0], nn.Linear) else 0,
            norm_eps=self.norm_eps,
        )


# timm's `crossvit_*_240` (the paper's 224 models renamed for their real input: 240 for the small-patch branch, its
# 224 resize for the large one); `crossvit_test` is CI-sized. name: (dims, heads, mlp ratio, large-branch depth)
_PAPER = {
    "crossvit_tiny_240": ((96, 192), 3, 4.0, 4),
    "crossvit_small_240": ((192, 384), 6, 4.0, 4),
    "crossvit_base_240": ((384, 768), 12, 4.0, 4),
    "crossvit_9_240": ((128, 256), 4, 3.0, 3),
    "crossvit_15_240": ((192, 384), 6, 3.0, 5),
    "crossvit_18_240": ((224, 448), 7, 3.0, 6),
}
register_sizes(
    CrossViT,
    {
        name: dict(embed_dim=dims, num_heads=(h, h), mlp_ratio=(r, r), depth=((1, d),) * 3)
        for name, (dims, h, r, d) in _PAPER.items()
    },
    # CPU-test size: one multi-scale block, 48 px (4 x 4 and, resized to 32, 2 x 2 tokens)
    smoke=dict(img_size=48, img_scale=(1.0, 2 / 3), depth=((1, 1),)),
)
register_sizes(
    CrossViT,
    {  # 32 px: 8 x 8 tokens of 4 px; resized to 24: 3 x 3 tokens of 8 px
        "crossvit_test": dict(
            img_size=32,
            img_scale=(1.0, 0.75),
            patch_size=(4, 8),
            embed_dim=(16, 32),
            depth=((1, 2), (1, 2)),
            num_heads=(2, 2),
            mlp_ratio=(2.0, 2.0),
        ),
    },
    smoke=dict(),
)
