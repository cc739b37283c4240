"""The text transformer of CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023): the text tower of a two-tower
model (models/two_tower.py), laid out as transformers' CLIPTextModel / SiglipTextModel.

The text backbone contract is in models/text_layers.py. The structure:
  token_embed (V, D) + pos_embed (max_seq_len, D): a learned absolute position per token
  blocks: x + attn(norm1(x)), then x + mlp(norm2(x)); LayerNorms with bias; attention with q/k/v/out biases
      (one fused qkv projection, split into q_proj/k_proj/v_proj on export, as models/vit_hf.py does); the MLP
      fc1 -> act -> fc2 (models.vit.ActMlp)
  norm: the final LayerNorm -> forward_features (the HF twin's last_hidden_state)
  forward_head: logits through the tied token embedding (no parameters of its own)
`causal` True is CLIP's text tower (each token sees the earlier ones; pooled at the first end-of-text token),
False SigLIP's (bidirectional; pooled at the last position). Both use ops.attention's dispatch, with `doc_ids`
(-1 = padding) keeping the documents of a packed row apart, like the other text families.
Parameter names mirror the ViT blocks (models/layers.py Block), so one key map serves both towers of CLIPModel.

Init follows open_clip's text transformer: token embeddings N(0, 0.02), positions N(0, 0.01), attention and MLP
input projections N(0, D^-0.5) and N(0, (2D)^-0.5), output projections N(0, D^-0.5 (2 depth)^-0.5); biases
zero, norms one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import register_sizes
from models.text_layers import check_text_inputs, run_layer
from models.vit import ActMlp, check_act
from ops.attention import attention


class TextAttention(nn.Module):
    """Multi-head self-attention (fused qkv with bias, output projection with bias), causal or bidirectional."""

    def __init__(self, dim: int, num_heads: int, causal: bool, backend: str):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.causal, self.backend = causal, backend
        self.qkv = nn.Linear(dim, 3 * dim)  # rows (q | k | v, head, head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)  # each (B, N, H, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, hd)
        out = attention(
            q, k, v, is_causal=self.causal, backend=self.backend, doc_ids=doc_ids
        )  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class TextBlock(nn.Module):
    """Pre-LN block: x + attn(norm1(x)), then x + mlp(norm2(x)) (CLIPEncoderLayer / SiglipEncoderLayer)."""

    def __init__(
        self, dim: int, num_heads: int, hidden: int, causal: bool, act: str, eps: float, backend: str
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = TextAttention(dim, num_heads, causal, backend)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = ActMlp(dim, hidden, act)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:  # (B, N, D)
        x = x + self.attn(self.norm1(x), doc_ids)
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    modality = "text"

    def __init__(
        self,
        vocab_size: int = 49408,
        embed_dim: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        max_seq_len: int = 77,
        causal: bool = True,
        act: str = "gelu",
        norm_eps: float = 1e-5,
        attn_backend: str = "auto",
    ):
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("embed_dim", embed_dim), ("depth", depth)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        check_act(act)
        self.vocab_size, self.max_seq_len, self.causal = vocab_size, max_seq_len, causal
        self.embed_dim = self.num_features = embed_dim
        self.num_heads, self.mlp_ratio, self.act, self.norm_eps = num_heads, mlp_ratio, act, norm_eps
        self.attn_backend = attn_backend
        hidden = round(embed_dim * mlp_ratio)  # round: a ratio read back from a width gives that width
        self.token_embed = nn.Embedding(vocab_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(max_seq_len, embed_dim))  # (max_seq_len, D)
        self.blocks = nn.ModuleList(
            TextBlock(embed_dim, num_heads, hidden, causal, act, norm_eps, attn_backend) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.grad_checkpointing = False
        self.init_weights()

    @property
    def default_pool(self) -> str:
        """Where a two-tower model pools this tower: CLIP the first end-of-text token (all earlier tokens reach
        it), SigLIP the last position."""
        return "eos" if self.causal else "last"

    def init_weights(self) -> None:
        """open_clip's text init (module docstring); deterministic given torch.manual_seed."""
        d, depth = self.embed_dim, len(self.blocks)
        attn_std, fc_std, out_std = d**-0.5, (2 * d) ** -0.5, d**-0.5 * (2 * depth) ** -0.5
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            for lin, std in (
                (blk.attn.qkv, attn_std),
                (blk.attn.proj, out_std),
                (blk.mlp.fc1, fc_std),
                (blk.mlp.fc2, out_std),
            ):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)

    # --- contract -------------------------------------------------------------------------------
    def attention_layout(self) -> list[dict]:
        """Per layer, for FLOP accounting (models/text_layers.py): full softmax attention over the document."""
        hd = self.embed_dim // self.num_heads
        return [{"kind": "softmax", "heads": self.num_heads, "head_dim": hd, "window": None}] * len(
            self.blocks
        )

    def no_weight_decay(self) -> set[str]:
        """The position table (as the ViT's); norm weights and biases are 1-D, undecayed by pretrain/optim.py."""
        return {"pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Regexes grouping parameters by depth (layer-wise LR decay): embeddings, one group per block, norm."""
        return {"stem": r"^token_embed\.|^pos_embed", "blocks": r"^blocks\.(\d+)\.", "head": r"^norm\."}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def hparams(self) -> dict:
        """Constructor arguments that rebuild this architecture (attn_backend, a runtime choice, left out)."""
        return dict(
            vocab_size=self.vocab_size,
            embed_dim=self.embed_dim,
            depth=len(self.blocks),
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            max_seq_len=self.max_seq_len,
            causal=self.causal,
            act=self.act,
            norm_eps=self.norm_eps,
        )

    def forward_features(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, N) -> hidden states (B, N, D) after the final LayerNorm."""
        positions = check_text_inputs(input_ids, positions, doc_ids, self.max_seq_len)
        x = self.token_embed(input_ids) + self.pos_embed[positions]  # (B, N, D)
        for blk in self.blocks:
            x = run_layer(blk, self.grad_checkpointing, x, doc_ids)
        return self.norm(x)

    def forward_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, N, D) -> logits (B, N, vocab_size) through the tied token embedding."""
        return F.linear(hidden, self.token_embed.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forward_head(self.forward_features(input_ids, positions, doc_ids))


# name: (embed_dim, depth, heads, max_seq_len, vocab, causal). `test` is CI-sized, `mini` trains on a CPU in
# minutes; base sizes are CLIP ViT-B/16's text tower (OpenAI BPE, 77 tokens) and SigLIP B/16's (64 tokens).
_SIZES = {
    "clip_text_test": (32, 2, 2, 77, 512, True),
    "clip_text_mini": (128, 4, 4, 77, 49408, True),
    "clip_text_base": (512, 12, 8, 77, 49408, True),
    "siglip_text_test": (32, 2, 2, 64, 512, False),
    "siglip_text_base": (768, 12, 12, 64, 32000, False),
}
register_sizes(
    TextTransformer,
    {
        name: dict(
            embed_dim=dim, depth=depth, num_heads=heads, max_seq_len=seq, vocab_size=vocab, causal=causal
        )
        for name, (dim, depth, heads, seq, vocab, causal) in _SIZES.items()
    },
    smoke=dict(depth=2, vocab_size=1000),  # CPU-test size (see models/__init__.py)
)
