"""Masked language modeling on packed rows (BERT's 80/10/10 recipe, ModernBERT's 30% rate by default).

Every real token that is not a special token (pad, BOS/CLS, EOS/SEP, mask, unk) is chosen with probability
`mask_prob`; of the chosen, `mask_replace` become the mask token, `random_replace` a random regular token, the rest
stay. The loss is cross-entropy on the chosen tokens only. The draw uses the global RNG, which the loop seeds from
(seed, step, rank) before every step, so a resumed run draws the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.errors import ConfigError
from pretrain.objectives import register_objective

IGNORE = -100


@dataclass
class MLMConfig:
    mask_prob: float = 0.30  # fraction of eligible tokens predicted (0.15 BERT, 0.30 ModernBERT)
    mask_replace: float = 0.8  # of those, replaced by the mask token
    random_replace: float = 0.1  # of those, replaced by a random regular token (the rest stay as they are)

    def validate(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"objective.mask_prob: must be in (0, 1), got {self.mask_prob}")
        for key in ("mask_replace", "random_replace"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"objective.{key}: must be in [0, 1], got {getattr(self, key)}")
        if self.mask_replace + self.random_replace > 1.0:
            raise ConfigError(
                f"objective.mask_replace + objective.random_replace: must be <= 1, got "
                f"{self.mask_replace} + {self.random_replace}"
            )


def mask_tokens(
    input_ids: torch.Tensor,
    eligible: torch.Tensor,
    cfg: MLMConfig,
    mask_id: int,
    regular_ids: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (B, N): the corrupted row and the original ids at chosen positions (IGNORE elsewhere).

    eligible (B, N) bool: tokens that may be chosen; regular_ids (R,): the ids a random replacement draws from.
    """
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)  # chosen?
    how = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)  # mask / random / keep
    pick = torch.randint(len(regular_ids), input_ids.shape, generator=generator, device=input_ids.device)
    chosen = eligible & (u < cfg.mask_prob)
    to_mask = chosen & (how < cfg.mask_replace)
    to_random = chosen & (how >= cfg.mask_replace) & (how < cfg.mask_replace + cfg.random_replace)
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    inputs = torch.where(to_random, regular_ids.to(input_ids.device)[pick], inputs)
    targets = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    return inputs, targets


@register_objective("mlm")
class MLM(nn.Module):
    Config = MLMConfig

    @classmethod
    def supports(cls, backbone: nn.Module) -> bool:
        """A bidirectional text model (an encoder family)."""
        return getattr(backbone, "modality", "image") == "text" and not getattr(backbone, "causal", True)

    needs_tokenizer = True

    def __init__(self, backbone: nn.Module, cfg: MLMConfig, tokenizer=None):
        super().__init__()
        if not self.supports(backbone):
            raise ValueError(
                f"mlm needs a bidirectional text model (an encoder family, e.g. modernbert_*); "
                f"{type(backbone).__name__} is not one"
            )
        if tokenizer is None or tokenizer.mask_id is None:
            raise ConfigError(
                "objective.name: mlm needs a tokenizer with a mask token (data.tokenizer has none; a tokenizer "
                "trained by Tessera has <mask>)"
            )
        self.cfg = cfg
        self.backbone = backbone
        self.mask_id = int(tokenizer.mask_id)
        special = sorted({int(i) for i in tokenizer.special_ids if i is not None})
        regular = torch.ones(
            tokenizer.vocab_size, dtype=torch.bool, device="cpu"
        )  # (not meta: nonzero() below)
        regular[special] = False
        # buffers, not tensors in a dict: they move with .to(device) and stay out of the state dict
        self.register_buffer(
            "special_ids", torch.tensor(special, dtype=torch.long, device="cpu"), persistent=False
        )
        self.register_buffer("regular_ids", regular.nonzero().flatten(), persistent=False)

    def forward(self, batch: dict) -> dict:
        ids, doc_ids = batch["input_ids"], batch["doc_ids"]  # (B, N), (B, N)
        eligible = (doc_ids >= 0) & ~torch.isin(ids, self.special_ids)
        inputs, targets = mask_tokens(ids, eligible, self.cfg, self.mask_id, self.regular_ids)
        logits = self.backbone(inputs, batch.get("positions"), doc_ids)  # (B, N, V)
        valid = targets != IGNORE
        count = valid.sum()
        loss_sum = F.cross_entropy(
            logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1),
            targets.flatten(),
            ignore_index=IGNORE,
            reduction="sum",
        )
        loss = loss_sum / count.clamp(min=1)
        acc = ((logits.argmax(-1) == targets) & valid).sum() / count.clamp(min=1)
        return {"loss": loss, "acc": acc.detach(), "masked": count.detach().float()}
