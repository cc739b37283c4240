"""Causal language modeling on packed rows: every token predicts the next token of its own document.

Targets come from the row itself (B, N): target[i] = input_ids[i + 1] when token i + 1 belongs to the same
document as token i, else ignored. So a document's last token never predicts the next document's first, padding
(doc id -1) is never an input that counts nor a target, and BOS (a document's first token) is never a target.
The loss is the mean over this micro-batch's counted targets (`tokens` reports how many).
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
class CLMConfig:
    z_loss: float = 0.0  # weight of log(Z)^2 per token (PaLM's stabilizer); 0 = off

    def validate(self) -> None:
        if self.z_loss < 0:
            raise ConfigError(f"objective.z_loss: must be >= 0, got {self.z_loss}")


def next_token_targets(
    input_ids: torch.Tensor, doc_ids: torch.Tensor, bos_id: int | None = None
) -> torch.Tensor:
    """(B, N) targets: the next token where it is in the same document, else IGNORE (last column included)."""
    targets = torch.full_like(input_ids, IGNORE)
    same_doc = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, :-1] >= 0)  # (B, N - 1)
    targets[:, :-1] = torch.where(same_doc, input_ids[:, 1:], IGNORE)
    if bos_id is not None:
        targets[targets == bos_id] = IGNORE  # a BOS inside a document is never a target either
    return targets


@register_objective("clm")
class CLM(nn.Module):
    Config = CLMConfig

    @classmethod
    def supports(cls, backbone: nn.Module) -> bool:
        """A causal text model (a decoder family)."""
        return getattr(backbone, "modality", "image") == "text" and getattr(backbone, "causal", False)

    needs_tokenizer = True

    def __init__(self, backbone: nn.Module, cfg: CLMConfig, tokenizer=None):
        super().__init__()
        if not self.supports(backbone):
            raise ValueError(
                f"clm needs a causal text model (a decoder family, e.g. llama_*); {type(backbone).__name__} is not one"
            )
        self.cfg = cfg
        self.backbone = backbone
        self.bos_id = getattr(tokenizer, "bos_id", None)

    def forward(self, batch: dict) -> dict:
        ids, doc_ids = batch["input_ids"], batch["doc_ids"]  # (B, N), (B, N)
        logits = self.backbone(ids, batch.get("positions"), doc_ids)  # (B, N, V)
        targets = next_token_targets(ids, doc_ids, self.bos_id)  # (B, N)
        valid = targets != IGNORE
        count = valid.sum()
        flat = logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(
            0, 1
        )  # (B*N, V): fp32 at least
        loss_sum = F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE, reduction="sum")
        loss = loss_sum / count.clamp(min=1)
        out = {"ce": loss.detach()}
        if self.cfg.z_loss:
            lse = torch.logsumexp(flat, dim=-1)[valid.flatten()]
            loss = loss + self.cfg.z_loss * lse.square().sum() / count.clamp(min=1)
        acc = ((logits.argmax(-1) == targets) & valid).sum() / count.clamp(min=1)
        out.update({"loss": loss, "acc": acc.detach(), "tokens": count.detach().float()})
        return out
