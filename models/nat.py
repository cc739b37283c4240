"""NAT (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023) and DiNAT (Hassani & Shi, "Dilated
Neighborhood Attention Transformer", 2022).

Stem: two 3x3 stride-2 convs (C/2, then C; no activation between) and a LayerNorm: a (H/4, W/4) token map. Four
stages of pre-norm blocks follow, x + ls1 * NA(norm1(x)), then x + ls2 * MLP(norm2(x)) (layer scale ls optional,
NAT-S/B), where NA is neighborhood attention (ops/neighborhood.py): each token attends to the k x k tokens around
it (shifted inward at the borders), with a relative position bias per head and offset. Between stages a 3x3
stride-2 conv (no bias) doubles the width, then a LayerNorm. Final LayerNorm, mean pool.

DiNAT: the same network with every second block of a stage dilated: dilation d = (map size) // k at the nominal
`img_size` (224: 8, 4, 2, 1 for maps 56, 28, 14, 7; DinatConfig's default), so its k x k keys span the whole
map. NAT is the case d = 1 everywhere. `dilations` gives the schedule explicitly (one list per stage).

Maps smaller than k * d (e.g. a small input) are zero-padded at the bottom/right after norm1, attended with the
padded tokens as unmasked keys and cropped, as the NAT/DiNAT releases and transformers' DinatLayer do.

The backbone contract is in models/__init__.py. Here:
  forward_features(images, mask=None) -> the last map's tokens (B, L, C), row-major, after the final norm (as Swin:
      transformers' DinatModel last_hidden_state is the same map channels-last, (B, H/32, W/32, C))
  forward_head(x, pre_logits=True) -> mean over the tokens (B, C) (DinatModel pooler_output)
  forward_intermediates(images) -> stage i's output (B, C_i, H_i, W_i), un-normed, before the next downsampling
  stem_stride = 4: `mask` is (B, ceil(H/4), ceil(W/4)) and replaces the normed stem output.
Layout: stage i > 0 starts with its downsampler (`stages.i.downsample`), transformers' `levels.{i-1}.downsample`.
`to_hf_state_dict` / `from_hf_state_dict` map the weights to and from transformers' DinatModel / NatModel (the
SHI-Labs checkpoints); both need the `natten` package to run, so tests/test_nat.py checks the parity with natten's
two kernels replaced by its definition.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hierarchical import HierarchicalBackbone, replace_masked, run_blocks
from models.layers import Mlp, drop_path, drop_path_rates
from models.registry import register_sizes
from ops.neighborhood import neighborhood_attention


class ConvStem(nn.Module):
    """3x3 conv stride 2 to C/2, 3x3 conv stride 2 to C, LayerNorm: (B, C_in, H, W) -> (B, H/4, W/4, C)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.conv1(x)).permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """3x3 conv stride 2 (no bias), C -> 2C, then LayerNorm: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood attention over a channels-last map, with the (heads, 2k-1, 2k-1) bias table `rpb`."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.kernel_size, self.dilation = num_heads, kernel_size, dilation
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        B, H, W, C = x.shape
        span = self.kernel_size * self.dilation
        x = F.pad(x, (0, 0, 0, max(span - W, 0), 0, max(span - H, 0)))  # (B, Hp, Wp, C): at least k * d
        Hp, Wp = x.shape[1:3]
        qkv = self.qkv(x).view(B, Hp, Wp, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # each (B, heads, Hp, Wp, hd)
        out = neighborhood_attention(
            q, k, v, self.kernel_size, self.dilation, self.rpb
        )  # (B, heads, Hp, Wp, hd)
        out = out.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C)[:, :H, :W]  # the padding cropped
        return self.proj(out)


class NATBlock(nn.Module):
    """x + ls1 * drop_path(NA(norm1(x))), then x + ls2 * drop_path(mlp(norm2(x))); channels-last."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        dilation: int = 1,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = True,
        layer_scale: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = NeighborhoodAttention(dim, num_heads, kernel_size, dilation, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path
        self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale > 0 else None
        self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        h = self.attn(self.norm1(x))
        x = x + drop_path(h if self.gamma1 is None else self.gamma1 * h, self.drop_path, self.training)
        h = self.mlp(self.norm2(x))
        return x + drop_path(h if self.gamma2 is None else self.gamma2 * h, self.drop_path, self.training)


class NATStage(nn.Module):
    """Optional downsampling (dim / 2 -> dim), then one block per entry of `dilations`."""

    def __init__(
        self, dim: int, dilations: Sequence[int], downsample: bool, drop_paths: Sequence[float], **kw
    ):
        super().__init__()
        self.downsample = Downsample(dim // 2) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            NATBlock(dim, dilation=d, drop_path=drop_paths[j], **kw) for j, d in enumerate(dilations)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C/2) -> (B, H/2, W/2, C) (or same size)
        return run_blocks(self, self.blocks, self.downsample(x))


def dinat_dilations(img_size: int, depths: Sequence[int], kernel_size: int) -> list[list[int]]:
    """DiNAT's schedule: blocks 1, 3, 5, ... of a stage dilated by (its map size at img_size) // k, the others 1."""
    out, size = [], -(-img_size // 4)  # stage 0 map: the stem grid
    for depth in depths:
        out.append([1 if j % 2 == 0 else max(size // kernel_size, 1) for j in range(depth)])
        size = -(-size // 2)
    return out


class NAT(HierarchicalBackbone):
    stem_stride = 4

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        embed_dim: int = 64,
        depths: Sequence[int] = (3, 4, 6, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        kernel_size: int = 7,
        dilated: bool = False,  # DiNAT: the schedule of `dinat_dilations` at img_size
        dilations: Sequence[Sequence[int]] | None = None,  # explicit per-block dilations; overrides `dilated`
        mlp_ratio: float = 3.0,
        qkv_bias: bool = True,
        layer_scale: float = 0.0,  # > 0: learned per-channel residual scales, initialised to this (NAT-S/B 1e-5)
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        mask_token: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        depths, num_heads = [int(d) for d in depths], [int(h) for h in num_heads]
        if len(depths) != len(num_heads) or not depths or min(depths) < 1:
            raise ValueError(
                f"depths {depths} and num_heads {num_heads} must be non-empty, equal length, >= 1"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if dilations is None:
            dilations = (
                dinat_dilations(img_size, depths, kernel_size) if dilated else [[1] * d for d in depths]
            )
        dilations = [[int(d) for d in stage] for stage in dilations]
        if [len(s) for s in dilations] != depths or min(min(s) for s in dilations) < 1:
            raise ValueError(
                f"dilations {dilations} must hold one positive value per block of depths {depths}"
            )
        self.img_size, self.in_chans, self.embed_dim = img_size, in_chans, embed_dim
        self.depths, self.num_heads, self.kernel_size = depths, num_heads, kernel_size
        self.dilated, self.dilations = dilated, dilations
        self.mlp_ratio, self.qkv_bias, self.layer_scale = mlp_ratio, qkv_bias, layer_scale
        self.drop_path_rate, self.norm_eps = drop_path_rate, norm_eps
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = dims[-1]
        self.stem = ConvStem(in_chans, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim)) if mask_token else None
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList(
            NATStage(
                dims[i],
                dilations[i],
                downsample=i > 0,
                drop_paths=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                num_heads=num_heads[i],
                kernel_size=kernel_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                layer_scale=layer_scale,
                norm_eps=norm_eps,
            )
            for i in range(len(depths))
        )
        self.norm = nn.LayerNorm(dims[-1], eps=norm_eps)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=d, reduction=4 * 2**i, module=f"stages.{i}") for i, d in enumerate(dims)
        ]
        self.init_weights()

    def init_weights(self) -> None:
        """The NAT release's init: truncated-normal(0.02) linears and bias tables, zero biases, unit LayerNorms;
        convs keep PyTorch's default."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, NeighborhoodAttention):
                nn.init.trunc_normal_(m.rpb, std=0.02)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    # --- contract -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        names = {n for n, _ in self.named_parameters() if n.endswith(".rpb")}  # the release's keyword "rpb"
        return names | ({"mask_token"} if self.mask_token is not None else set())

    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters by depth (for layer-wise LR decay): stem, then stages/blocks (a stage's
        downsampling joins its first block), then the final norm and head."""
        blocks = (
            r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)]
        )
        return {"stem": r"^stem|^mask_token", "blocks": blocks, "head": r"^norm|^head"}

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normed stem output (B, H/4, W/4, C); masked positions (True) become the mask token or zeros."""
        return replace_masked(self.stem(images), mask, self.mask_token, "channels_last")

    def stage_map(self, i: int, x: torch.Tensor) -> torch.Tensor:  # (B, H_i, W_i, C_i) -> (B, C_i, H_i, W_i)
        return x.permute(0, 3, 1, 2)

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(super().forward_features(images, mask)).flatten(1, 2)  # (B, H/32 * W/32, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=1)  # (B, C)
        return x if pre_logits else self.head(x)

    def hparams(self) -> dict:
        """Constructor arguments that rebuild this architecture (lists, so YAML can hold them)."""
        return dict(
            img_size=self.img_size,
            in_chans=self.in_chans,
            embed_dim=self.embed_dim,
            depths=list(self.depths),
            num_heads=list(self.num_heads),
            kernel_size=self.kernel_size,
            dilated=self.dilated,
            dilations=[list(s) for s in self.dilations],
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            layer_scale=self.layer_scale,
            num_classes=self.head.out_features if isinstance(self.head, nn.Linear) else 0,
            drop_path_rate=self.drop_path_rate,
            mask_token=self.mask_token is not None,
            norm_eps=self.norm_eps,
        )


# name: (embed_dim, depths, heads, mlp_ratio, layer_scale); the NAT paper's Table 1 sizes (20M, 28M, 51M, 90M),
# which DiNAT keeps, at 224 px with k = 7. The `_test` sizes are CI-sized (k = 3; DiNAT dilates stage 0 by 5 and
# stage 1 by 2 at 64 px).
_SIZES = {
    "mini": (64, (3, 4, 6, 5), (2, 4, 8, 16), 3.0, 0.0),
    "tiny": (64, (3, 4, 18, 5), (2, 4, 8, 16), 3.0, 0.0),
    "small": (96, (3, 4, 18, 5), (3, 6, 12, 24), 2.0, 1e-5),
    "base": (128, (3, 4, 18, 5), (4, 8, 16, 32), 2.0, 1e-5),
}
_TEST = dict(
    img_size=64, embed_dim=16, depths=(2, 2, 2, 1), num_heads=(1, 2, 4, 8), kernel_size=3, mlp_ratio=2.0
)
for _family, _dilated in (("nat", False), ("dinat", True)):
    register_sizes(NAT, {f"{_family}_test": dict(_TEST, dilated=_dilated)}, smoke=dict(img_size=32))
    register_sizes(
        NAT,
        {
            f"{_family}_{name}": dict(
                embed_dim=dim, depths=depths, num_heads=heads, mlp_ratio=mlp, layer_scale=ls, dilated=_dilated
            )
            for name, (dim, depths, heads, mlp, ls) in _SIZES.items()
        },
        smoke=dict(img_size=64, depths=(2, 1, 1, 1)),
    )


# --- transformers' DinatModel / NatModel key map ------------------------------------------------------------------
_TOP = {  # ours -> theirs, outside the stages
    "stem.conv1.": "embeddings.patch_embeddings.projection.0.",
    "stem.conv2.": "embeddings.patch_embeddings.projection.1.",
    "stem.norm.": "embeddings.norm.",
    "norm.": "layernorm.",
}
_BLOCK = {  # inside stages.i.blocks.j / encoder.levels.i.layers.j; qkv and gamma1/2 are split/stacked
    "norm1.": "layernorm_before.",
    "attn.rpb": "attention.self.rpb",
    "attn.proj.": "attention.output.dense.",
    "norm2.": "layernorm_after.",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
}


def _swap(name: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if name.startswith(old):
            return new + name[len(old) :]
    raise KeyError(f"{name!r} has no counterpart in the NAT/DiNAT key map")


def to_hf_state_dict(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Our state dict -> DinatModel / NatModel keys under `prefix` ("dinat." / "nat." for the classifiers, whose
    `classifier` takes our `head`). `mask_token` has no counterpart and is left out."""
    out = {}
    for name, t in sd.items():
        if name == "mask_token":
            continue
        if name.startswith("head."):
            out["classifier." + name[5:]] = t
        elif m := re.fullmatch(r"stages\.(\d+)\.downsample\.(.*)", name):
            out[f"{prefix}encoder.levels.{int(m[1]) - 1}.downsample.{m[2]}"] = t
        elif m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", name):
            where, rest = f"{prefix}encoder.levels.{m[1]}.layers.{m[2]}.", m[3]
            if rest.startswith("attn.qkv."):
                for part, piece in zip(("query", "key", "value"), t.chunk(3)):
                    out[f"{where}attention.self.{part}.{rest[9:]}"] = piece
            elif rest == "gamma1":  # (2, C): [attention, MLP]
                out[where + "layer_scale_parameters"] = torch.stack([t, sd[name[:-1] + "2"]])
            elif rest != "gamma2":
                out[where + _swap(rest, _BLOCK)] = t
        else:
            out[prefix + _swap(name, _TOP)] = t
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DinatModel / NatModel / *ForImageClassification keys -> ours (inverse of `to_hf_state_dict`)."""
    top, block = {v: k for k, v in _TOP.items()}, {v: k for k, v in _BLOCK.items()}
    out = {}
    for full, t in sd.items():
        name = re.sub(r"^(dinat|nat)\.", "", full)
        if name.startswith("classifier."):
            out["head." + name[11:]] = t
        elif m := re.fullmatch(r"encoder\.levels\.(\d+)\.downsample\.(.*)", name):
            out[f"stages.{int(m[1]) + 1}.downsample.{m[2]}"] = t
        elif m := re.fullmatch(r"encoder\.levels\.(\d+)\.layers\.(\d+)\.(.*)", name):
            where, rest = f"stages.{m[1]}.blocks.{m[2]}.", m[3]
            if qkv := re.fullmatch(r"attention\.self\.query\.(\w+)", rest):
                parts = [sd[full.replace(".query.", f".{p}.")] for p in ("query", "key", "value")]
                out[f"{where}attn.qkv.{qkv[1]}"] = torch.cat(parts)
            elif rest == "layer_scale_parameters":
                out[where + "gamma1"], out[where + "gamma2"] = t.unbind(0)
            elif not re.fullmatch(r"attention\.self\.(key|value)\.\w+", rest):
                out[where + _swap(rest, block)] = t
        else:
            out[_swap(name, top)] = t
    return out
