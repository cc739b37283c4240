"""Llama-style causal decoder (Touvron et al. 2023; torchtitan's Llama 3 block), with optional linear-attention
and hybrid layers, for long-context causal-LM pretraining on packed rows.

The text backbone contract is in models/text_layers.py. The block is pre-norm:
    h = x + attn(norm1(x));  out = h + mlp(norm2(h))
with RMSNorm, rotate-half RoPE at the row's explicit positions (they restart at 0 at every document of a packed
row), grouped-query attention (`num_kv_heads` <= `num_heads`; ops.attention handles the sharing), a SwiGLU MLP
and no biases. Attention is causal and document-masked: `doc_ids` keep every token inside its own document, so a
packed row computes what its documents compute alone. `sliding_window=W` lets each query see its last W keys
(itself included, Mistral's convention) in every softmax layer.

Linear attention (`linear_attn` = "none" | "retention" | "gla", the modes of ops.linear_attention): with
`softmax_every=0` every layer is linear; with `softmax_every=n` layer i is a softmax layer iff i % n == n - 1
(the n-th, 2n-th, ... layer, so a depth that is a multiple of n ends on softmax attention), the rest linear.
Linear layers apply no RoPE: position enters through causality and, for retention/GLA, the decay.

Parameter names (the HF key map is in models/llama_hf.py): embed, blocks.i.{norm1, attn.{q,k,v,o}_proj, norm2,
mlp.{w1,w2,w3}}, norm, lm_head (absent when tie_embeddings: the head is embed.weight). Linear layers add
blocks.i.attn.out_norm and, for GLA, blocks.i.attn.gate.{0,1}.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import register_sizes
from models.text_layers import (
    RMSNorm,
    SwiGLU,
    apply_rope,
    check_text_inputs,
    llama_ffn_hidden,
    rope_cos_sin,
    rope_inv_freq,
    run_layer,
)
from ops.attention import attention
from ops.linear_attention import linear_attention

LINEAR_MODES = ("none", "retention", "gla")
GLA_GATE_RANK = 16  # GLA's low-rank gate projection (Yang et al. 2024)
GLA_GATE_TEMPERATURE = 16.0  # log-gates are logsigmoid(.) / 16: decays near 1, long memory at init


class CausalSelfAttention(nn.Module):
    """Causal, document-masked GQA softmax attention with RoPE, optionally within a sliding window."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, sliding_window: int | None, backend: str):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.window = None if sliding_window is None else (sliding_window - 1, 0)  # (left, right) keys
        self.backend = backend
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_ids: torch.Tensor | None):
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        k = self.k_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, N, hd)
        v = self.v_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, N, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attention(q, k, v, is_causal=True, backend=self.backend, doc_ids=doc_ids, window=self.window)
        return self.o_proj(o.transpose(1, 2).reshape(B, N, -1))  # (B, N, D)


class LinearSelfAttention(nn.Module):
    """Causal linear attention (ops.linear_attention) whose state restarts at every document.

    mode "none" uses the elu+1 feature map of Katharopoulos et al. (2020): a positive kernel, so every past
    token gets a non-negative weight q.k as in softmax attention (the identity map could give a key negative
    weight, which softmax never does). No normalising denominator: the per-head output RMSNorm removes the
    scale instead (it grows with the document length), which TransNormer (Qin et al. 2022) found stabler.
    "retention" (RetNet's fixed per-head decay) and "gla" (data-dependent decay from a low-rank gate:
    logsigmoid(x W1 W2 + b) / 16, the one bias in the model, as in GLA) use q and k as projected (the identity
    map), as their papers do: the decay already bounds the state. No RoPE: order comes from causality and the
    decay. All heads have their own k and v (no grouped-query sharing: the state is per head anyway).
    """

    def __init__(self, dim: int, num_heads: int, mode: str, norm_eps: float):
        super().__init__()
        self.num_heads, self.head_dim, self.mode = num_heads, dim // num_heads, mode
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.out_norm = RMSNorm(self.head_dim, eps=norm_eps)  # per head, weights shared across heads
        if mode == "gla":
            self.gate = nn.Sequential(
                nn.Linear(dim, GLA_GATE_RANK, bias=False), nn.Linear(GLA_GATE_RANK, dim)
            )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_ids: torch.Tensor | None):
        B, N, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        g = None
        if self.mode == "none":
            q, k = F.elu(q) + 1, F.elu(k) + 1
        elif self.mode == "gla":
            logits = self.gate(x).float()  # (B, N, D), fp32: the decays compound over the whole document
            g = heads(F.logsigmoid(logits) / GLA_GATE_TEMPERATURE)  # (B, H, N, hd) log-gates <= 0
        o = linear_attention(q, k, v, mode=self.mode, g=g, doc_ids=doc_ids)  # (B, H, N, hd)
        o = self.out_norm(o.transpose(1, 2).to(x.dtype))  # (B, N, H, hd)
        return self.o_proj(o.reshape(B, N, -1))  # (B, N, D)


class Block(nn.Module):
    def __init__(self, dim: int, attn: nn.Module, ffn_hidden: int, norm_eps: float):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=norm_eps)
        self.attn = attn
        self.norm2 = RMSNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, ffn_hidden)

    def forward(self, x, cos, sin, doc_ids):
        h = x + self.attn(self.norm1(x), cos, sin, doc_ids)
        return h + self.mlp(self.norm2(h))


class LlamaDecoder(nn.Module):
    modality = "text"
    causal = True  # each token attends to its document's earlier tokens (clm)

    def __init__(
        self,
        vocab_size: int = 32000,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        num_kv_heads: int | None = None,  # None: = num_heads (multi-head attention)
        ffn_hidden: int | None = None,  # None: text_layers.llama_ffn_hidden(dim)
        max_seq_len: int = 8192,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        tie_embeddings: bool = False,
        sliding_window: int | None = None,
        linear_attn: str | None = None,
        softmax_every: int = 0,
        attn_backend: str = "auto",
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, v in (("vocab_size", vocab_size), ("dim", dim), ("depth", depth), ("num_heads", num_heads)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} must split into num_heads {num_heads} heads of an even size (RoPE)")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        if linear_attn is not None and linear_attn not in LINEAR_MODES:
            raise ValueError(f"linear_attn must be one of {LINEAR_MODES} or None, got {linear_attn!r}")
        if softmax_every < 0 or (linear_attn is None and softmax_every):
            raise ValueError(f"softmax_every={softmax_every} needs linear_attn and must be >= 0")
        if max_seq_len < 1 or (ffn_hidden is not None and ffn_hidden < 1):
            raise ValueError(f"max_seq_len ({max_seq_len}) and ffn_hidden ({ffn_hidden}) must be >= 1")
        self.vocab_size, self.dim, self.num_features = vocab_size, dim, dim
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.ffn_hidden = llama_ffn_hidden(dim) if ffn_hidden is None else ffn_hidden
        self.max_seq_len, self.rope_theta, self.norm_eps = max_seq_len, float(rope_theta), norm_eps
        self.tie_embeddings, self.sliding_window = tie_embeddings, sliding_window
        self.linear_attn, self.softmax_every = linear_attn, softmax_every
        self.softmax_layers = [i for i in range(depth) if self.is_softmax_layer(i)]
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                CausalSelfAttention(dim, num_heads, num_kv_heads, sliding_window, attn_backend)
                if i in self.softmax_layers
                else LinearSelfAttention(dim, num_heads, linear_attn, norm_eps),
                self.ffn_hidden,
                norm_eps,
            )
            for i in range(depth)
        )
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.lm_head = None if tie_embeddings else nn.Linear(dim, vocab_size, bias=False)
        self.grad_checkpointing = False
        self.init_weights()

    def attention_layout(self) -> list[dict]:
        """Per layer, for FLOP accounting (models/text_layers.py): softmax layers see their document (at most
        `sliding_window` keys); linear layers run ops.linear_attention over full heads."""
        hd = self.head_dim
        return [
            {"kind": "softmax", "heads": self.num_heads, "head_dim": hd, "window": self.sliding_window}
            if self.is_softmax_layer(i)
            else {
                "kind": "linear",
                "heads": self.num_heads,
                "head_dim": hd,
                "window": None,
                "mode": self.linear_attn,
                "dk": hd,
                "dv": hd,
            }
            for i in range(len(self.blocks))
        ]

    def is_softmax_layer(self, i: int) -> bool:
        """Layer i uses softmax attention: every layer without linear_attn, else every softmax_every-th."""
        if self.linear_attn is None:
            return True
        return self.softmax_every > 0 and i % self.softmax_every == self.softmax_every - 1

    def init_weights(self) -> None:
        """GPT-2 / nanoGPT: every weight N(0, 0.02), the residual branches' output projections (attn.o_proj,
        mlp.w2) N(0, 0.02 / sqrt(2 * depth)) so the residual stream's variance does not grow with depth; norms
        one, the GLA gate bias zero. Deterministic given torch.manual_seed."""
        out_std = 0.02 / math.sqrt(2 * len(self.blocks))
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.ndim == 1:  # RMSNorm weights
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "mlp.w2.weight")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=0.02)

    # --- contract -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Norm weights (and the GLA gate bias): every 1-D parameter. The embedding is decayed like the other
        matrices (nanoGPT, GPT-3): tied, it is the output projection too."""
        return {n for n, p in self.named_parameters() if p.ndim == 1}

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Regexes grouping parameters by depth (layer-wise LR decay): embedding, one group per block, head."""
        return {"stem": r"^embed\.", "blocks": r"^blocks\.(\d+)\.", "head": r"^norm\.|^lm_head\."}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, N) token ids -> (B, N, D) hidden states after the final norm."""
        positions = check_text_inputs(input_ids, positions, doc_ids, self.max_seq_len)
        x = self.embed(input_ids)  # (B, N, D)
        # computed per call, not kept as a buffer: a model cast to bf16 would round a buffer's frequencies
        inv_freq = rope_inv_freq(self.head_dim, self.rope_theta).to(input_ids.device)  # (hd / 2,)
        cos, sin = rope_cos_sin(positions, inv_freq)  # (B, 1, N, hd) each, fp32
        for blk in self.blocks:
            x = run_layer(blk, self.grad_checkpointing, x, cos, sin, doc_ids)
        return self.norm(x)

    def forward_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> logits (B, N, vocab_size)."""
        return F.linear(hidden, self.embed.weight) if self.lm_head is None else self.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forward_head(self.forward_features(input_ids, positions, doc_ids))

    def hparams(self) -> dict:
        """Constructor arguments that rebuild this architecture (attn_backend, a runtime choice, left out)."""
        return dict(
            vocab_size=self.vocab_size,
            dim=self.dim,
            depth=len(self.blocks),
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            ffn_hidden=self.ffn_hidden,
            max_seq_len=self.max_seq_len,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            tie_embeddings=self.tie_embeddings,
            sliding_window=self.sliding_window,
            linear_attn=self.linear_attn,
            softmax_every=self.softmax_every,
        )


# name: (dim, depth, heads, max_seq_len). `llama_test` is CI-sized (2 kv heads: GQA); the rest are llm-foundry's
# MPT widths (125m..1b), multi-head. RoPE needs no table, so max_seq_len is only the promise HF's
# max_position_embeddings records: 8k for the small two, 32k for 760m and 1b (the anchors' long-context rows).
# rope_theta 500000 (Llama 3's, meant for 8k+ contexts) throughout.
_SIZES = {
    "llama_test": (64, 2, 4, 8192),
    "llama_125m": (768, 12, 12, 8192),
    "llama_350m": (1024, 24, 16, 8192),
    "llama_760m": (1536, 24, 12, 32768),
    "llama_1b": (2048, 24, 16, 32768),
}
register_sizes(
    LlamaDecoder,
    {
        name: dict(
            vocab_size=512 if name == "llama_test" else 32000,
            dim=dim,
            depth=depth,
            num_heads=heads,
            num_kv_heads=2 if name == "llama_test" else heads,
            max_seq_len=seq,
            rope_theta=500000.0,
        )
        for name, (dim, depth, heads, seq) in _SIZES.items()
    },
    smoke=dict(depth=2, vocab_size=1000),  # CPU-test size (see models/__init__.py)
)
