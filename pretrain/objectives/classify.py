"""Supervised classification (DeiT / timm train.py style): any registered backbone + its linear head, cross-entropy
with label smoothing. Trains every family, hierarchical ones included, and exports as <Family>ForImageClassification."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from pretrain.errors import ConfigError
from pretrain.objectives import register_objective


@dataclass
class ClassifyConfig:
    num_classes: int = 0  # the dataset's class count (required)
    label_smoothing: float = 0.1

    def validate(self) -> None:
        if self.num_classes < 2:
            raise ConfigError(
                f"objective.num_classes: must be the dataset's class count (>= 2), got {self.num_classes}"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"objective.label_smoothing: must be in [0, 1), got {self.label_smoothing}")


@register_objective("classify")
class Classify(nn.Module):
    Config = ClassifyConfig

    @classmethod
    def supports(cls, backbone: nn.Module) -> bool:
        """Every image backbone (its head is reset to the class count)."""
        return getattr(backbone, "modality", "image") == "image"

    def __init__(self, backbone: nn.Module, cfg: ClassifyConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        backbone.reset_classifier(cfg.num_classes)  # the head lives in the backbone: it exports with it

    def forward(self, batch: dict) -> dict:
        logits = self.backbone(batch["image"])  # (B, num_classes)
        labels = batch["label"]  # (B,)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
        acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "acc": acc.detach()}
