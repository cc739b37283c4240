"""Knowledge distillation from a frozen teacher (`distill`): online, or from stored sparse teacher outputs.

    loss = kd_weight * KD(student logits, teacher) + label_weight * CE(student logits, labels)
         + feature_weight * MSE(proj(student features), norm(teacher features))

KD is soft (T^2 * KL(p_teacher(T) || p_student(T)), `kd_reduction: batchmean` = summed over classes, averaged over
the batch, torch's "batchmean"; `deit` = averaged over batch x classes, DeiT's losses.py: C times smaller) or hard
(`hard: true`: cross-entropy on the teacher's argmax, DeiT's hard distillation). A student with a distillation
token (ViT `distill_token: true`, DeiT) trains its class head on the labels and its distillation head on the
teacher; its inference output is their mean (what the export's logits are). Feature distillation regresses the
teacher's pooled features from the student's `feature_stage` (an index into `feature_info`; -1 = the pooled final
features) through a trainable linear projection (part of the objective, not exported); `feature_norm` layer-norms
the teacher's features first (no affine), so the loss does not depend on their scale.

The teacher (pretrain/teacher.py) is loaded when the objective is built, replicated on every rank and never part
of the module tree: not trained, not in the optimizer, not sharded, not checkpointed (resume loads it again).
With `teacher_outputs: DIR` (pretrain/teacher_store.py, written by `python -m pretrain.distill save-teacher`), the
targets come from the store instead, looked up by each sample's (epoch, id); no teacher runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.errors import ConfigError
from pretrain.objectives import register_objective

KD_REDUCTIONS = ("batchmean", "deit")
# Debugging aid: with this variable set to a folder, every training view's sha256 is appended to
# FOLDER/rank<r>.jsonl as {"epoch", "index", "sha256"}: compare with what save-teacher fed its teacher
# (tests/test_distill.py does).
VIEW_LOG = "TESSERA_DISTILL_VIEW_LOG"


@dataclass
class DistillConfig:
    # The teacher: a registered model name (+ teacher_weights), a Tessera run dir / checkpoint, or a Hugging Face
    # folder (pretrain/teacher.py). Optional with teacher_outputs (then, if set, it must be the store's teacher).
    teacher: str | None = None
    # A state-dict file in the registered model's key layout, or "imagenet" (MobileNetV2, torchvision layout).
    teacher_weights: str | None = None
    teacher_kwargs: dict = field(default_factory=dict)  # constructor overrides of a registered teacher
    # The teacher's input: default its own preprocessing (the run's / folder's / the weights'), else these.
    teacher_image_size: int | None = None
    teacher_mean: list[float] | None = None
    teacher_std: list[float] | None = None
    # Stored sparse teacher outputs (python -m pretrain.distill save-teacher writes them here).
    teacher_outputs: str | None = None
    topk: int = 10  # what save-teacher stores: the top k probabilities per sample and epoch
    save_epochs: int | None = None  # epochs save-teacher covers (default: what train.steps needs)
    num_classes: int = 0  # the student head's outputs; 0 = the teacher's class count
    temperature: float = 1.0
    kd_weight: float = 1.0
    hard: bool = False
    kd_reduction: str = "batchmean"
    label_weight: float = 0.0
    label_smoothing: float = 0.0
    feature_weight: float = 0.0
    feature_stage: int = -1
    feature_norm: bool = True
    # Filled in when the objective is built (the teacher's pooled feature width), like num_classes: a run's
    # config.yaml then rebuilds the trained student without loading its teacher or store (export, probe).
    teacher_feature_dim: int = 0

    def validate(self) -> None:
        if not self.teacher and not self.teacher_outputs:
            raise ConfigError(
                "objective.teacher: a distill objective needs a teacher or objective.teacher_outputs"
            )
        if self.teacher_weights and not self.teacher:
            raise ConfigError(
                "objective.teacher_weights: set objective.teacher (the model these weights are for)"
            )
        if self.temperature <= 0:
            raise ConfigError(f"objective.temperature: must be > 0, got {self.temperature}")
        for key in ("kd_weight", "label_weight", "feature_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"objective.{key}: must be >= 0, got {getattr(self, key)}")
        if self.kd_weight + self.label_weight + self.feature_weight == 0:
            raise ConfigError("objective.kd_weight: kd_weight, label_weight and feature_weight are all 0")
        if self.kd_reduction not in KD_REDUCTIONS:
            raise ConfigError(
                f"objective.kd_reduction: must be one of {list(KD_REDUCTIONS)}, got {self.kd_reduction!r}"
            )
        if self.feature_weight > 0 and self.teacher_outputs:
            raise ConfigError(
                "objective.feature_weight: stored teacher outputs hold top-k probabilities only; feature "
                "distillation needs the online teacher (unset objective.teacher_outputs)"
            )
        if self.topk < 1:
            raise ConfigError(f"objective.topk: must be >= 1, got {self.topk}")
        if self.save_epochs is not None and self.save_epochs < 1:
            raise ConfigError(f"objective.save_epochs: must be >= 1, got {self.save_epochs}")
        if self.num_classes < 0 or self.num_classes == 1:
            raise ConfigError(
                f"objective.num_classes: must be 0 (the teacher's) or >= 2, got {self.num_classes}"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"objective.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        for key in ("teacher_mean", "teacher_std"):
            v = getattr(self, key)
            if v is not None and (not v or any(not isinstance(x, int | float) for x in v)):
                raise ConfigError(f"objective.{key}: a list of numbers, got {v!r}")
        if self.teacher_image_size is not None and self.teacher_image_size <= 0:
            raise ConfigError(f"objective.teacher_image_size: must be > 0, got {self.teacher_image_size}")


def kd_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float, reduction: str
) -> torch.Tensor:
    """T^2 * KL(teacher || student) with the student at temperature T; `teacher_probs` (B, C) already at T.
    batchmean: sum over classes / B; deit: sum / (B * C) (DeiT's `kl_div(..., 'sum') / outputs_kd.numel()`)."""
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    p = teacher_probs.float()
    kl = (torch.xlogy(p, p) - p * logq).sum()  # 0 * log 0 = 0
    denom = p.shape[0] if reduction == "batchmean" else p.numel()
    return kl / denom * temperature**2


def student_input(data) -> object:
    """The student's image preprocessing (pretrain.teacher.TeacherInput) from the run's DataConfig: its eval
    transform, as the export's image processor records it (pretrain.hf_files.Preprocess)."""
    from pretrain.hf_files import Preprocess
    from pretrain.teacher import TeacherInput

    p = Preprocess.from_data(data)
    return TeacherInput(p.image_size, p.channels, p.mean, p.std)


def load_configured_teacher(cfg: DistillConfig, data):
    from pretrain.teacher import load_teacher

    return load_teacher(
        cfg.teacher,
        weights=cfg.teacher_weights,
        kwargs=cfg.teacher_kwargs,
        size=cfg.teacher_image_size,
        mean=cfg.teacher_mean,
        std=cfg.teacher_std,
        student=student_input(data),
    )


def teacher_identity(cfg: DistillConfig, teacher) -> dict:
    return {
        "spec": cfg.teacher,
        "weights": cfg.teacher_weights,
        "fingerprint": teacher.fingerprint,
        "input": teacher.input.as_dict(),
        "num_classes": teacher.num_classes,
    }


@register_objective("distill")
class Distill(nn.Module):
    Config = DistillConfig
    needs_seed = True
    needs_data = True

    @classmethod
    def supports(cls, backbone: nn.Module) -> bool:
        """Every image backbone (its head is reset to the teacher's classes)."""
        return getattr(backbone, "modality", "image") == "image"

    def __init__(self, backbone: nn.Module, cfg: DistillConfig, seed: int = 0, data=None):
        super().__init__()
        if data is None:
            raise ValueError("the distill objective needs the run's data config")
        self.cfg = cfg
        self.seed = seed
        self.student_input = student_input(data)
        self.teacher = None  # pretrain.teacher.Teacher (not a Module: never registered)
        self.store = None  # pretrain.teacher_store.TeacherStore
        resolved = bool(cfg.num_classes and (cfg.feature_weight == 0 or cfg.teacher_feature_dim))
        if (
            _WITHOUT_TEACHER and resolved
        ):  # rebuilding a trained student (export, probe): no teacher, no store
            classes = cfg.num_classes
        else:
            if cfg.teacher:
                self.teacher = _cached_teacher(cfg, data)
            if cfg.teacher_outputs:
                self.store = _open_store(cfg, data, seed, self.teacher)
                classes = self.store.num_classes
            else:
                classes = self.teacher.num_classes
                if classes == 0 and cfg.kd_weight > 0:
                    raise ConfigError(
                        f"objective.teacher: {self.teacher.description} has no classifier head; logit "
                        "distillation (objective.kd_weight > 0) needs one; use feature distillation (kd_weight: 0, "
                        "feature_weight > 0)"
                    )
        num = cfg.num_classes or classes
        if cfg.kd_weight > 0 and num != classes:
            raise ConfigError(
                f"objective.num_classes: {cfg.num_classes} student outputs, but the teacher has {classes} classes"
            )
        if num < 2:
            raise ConfigError(
                "objective.num_classes: the student needs >= 2 outputs (set it for feature-only runs)"
            )
        self.num_classes = cfg.num_classes = num  # recorded in the run's config.yaml (see _WITHOUT_TEACHER)
        self.backbone = backbone
        backbone.reset_classifier(num)  # the head lives in the backbone: it exports with it
        self.distilled = getattr(backbone, "dist_token", None) is not None  # DeiT: ViT with distill_token
        if self.distilled and cfg.label_weight <= 0:
            raise ConfigError(
                "objective.label_weight: a student with a distillation token trains its class head on the labels "
                "(DeiT: label_weight 0.5, kd_weight 0.5); set label_weight > 0"
            )
        if cfg.feature_weight > 0:
            n = len(backbone.feature_info)
            if not -n <= cfg.feature_stage < n:
                raise ConfigError(
                    f"objective.feature_stage: {cfg.feature_stage} is outside the student's {n} stages"
                )
            width = (
                backbone.num_features
                if cfg.feature_stage == -1
                else backbone.feature_info[cfg.feature_stage]["num_chs"]
            )
            if self.teacher is not None:
                with torch.device("cpu"):
                    cfg.teacher_feature_dim = self.teacher.num_features
            dim = cfg.teacher_feature_dim
            self.feature_proj = nn.Linear(width, dim)  # (C_s) -> (F_t)

    # --- the student -----------------------------------------------------------------------------------

    def _student(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(logits used for KD, logits used for labels, pooled features for feature distillation or None)."""
        b = self.backbone
        want_feat = self.cfg.feature_weight > 0
        stage = self.cfg.feature_stage
        inter = None
        if want_feat and stage != -1 and hasattr(b, "run_stage"):  # one pass, the stage map kept on the way
            n = len(b.feature_info)
            x = b.embed(images)
            for i in range(n):
                x = b.run_stage(i, x)
                if i == stage % n:
                    inter = b.stage_map(i, x)  # (B, C_i, H_i, W_i)
            feats = x
        else:
            feats = b.forward_features(images)
            if want_feat and stage != -1:
                inter = b.forward_intermediates(images, indices=[stage])[0]
        pooled = None
        if want_feat:
            pooled = (
                inter.float().mean((2, 3)) if inter is not None else b.forward_head(feats, pre_logits=True)
            )
        if self.distilled:
            cls_logits, dist_logits = b.forward_head_distilled(feats)
            return dist_logits, cls_logits, pooled
        logits = b.forward_head(feats)
        return logits, logits, pooled

    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        images = batch["image"]
        if VIEW_LOG in os.environ:
            _log_views(batch)
        kd_logits, label_logits, s_feat = self._student(images)
        out: dict[str, torch.Tensor] = {}
        loss = kd_logits.new_zeros((), dtype=torch.float32)
        t_out = None
        if self.store is None and (cfg.kd_weight > 0 or cfg.feature_weight > 0):
            t_out = self.teacher(images, self.student_input)  # fp32, no grad
        if cfg.kd_weight > 0:
            if self.store is not None:
                found = self.store.lookup(batch["index"], batch["epoch"])
                top1 = found.indices[:, 0]
                probs = None if cfg.hard else _dense(found, self.num_classes)
            else:
                top1 = t_out["logits"].argmax(-1)
                probs = None if cfg.hard else F.softmax(t_out["logits"] / cfg.temperature, dim=-1)
            if cfg.hard:
                kd = F.cross_entropy(kd_logits.float(), top1)
            else:
                kd = kd_loss(kd_logits, probs, cfg.temperature, cfg.kd_reduction)
            loss = loss + cfg.kd_weight * kd
            out["kd"] = kd.detach()
            out["teacher_agree"] = (kd_logits.argmax(-1) == top1).float().mean().detach()
        if cfg.label_weight > 0:
            labels = batch["label"]
            ce = F.cross_entropy(label_logits.float(), labels, label_smoothing=cfg.label_smoothing)
            loss = loss + cfg.label_weight * ce
            out["ce"] = ce.detach()
        if cfg.feature_weight > 0:
            target = t_out["features"]
            if cfg.feature_norm:
                target = F.layer_norm(target, target.shape[-1:])
            pred = self.feature_proj(s_feat.to(self.feature_proj.weight.dtype)).float()
            feat = F.mse_loss(pred, target)
            loss = loss + cfg.feature_weight * feat
            out["feat"] = feat.detach()
        if cfg.label_weight > 0:  # the head's classes are the labels' (else they are the teacher's own)
            logits = kd_logits if not self.distilled else (kd_logits + label_logits) / 2
            out["acc"] = (logits.argmax(-1) == batch["label"]).float().mean().detach()
        return {"loss": loss, **out}


def _log_views(batch: dict) -> None:
    rank = int(os.environ.get("RANK", "0"))
    folder = os.environ[VIEW_LOG]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.jsonl"), "a") as f:
        for img, i, e in zip(
            batch["image"].detach().float().cpu(), batch["index"].tolist(), batch["epoch"].tolist()
        ):
            digest = hashlib.sha256(img.contiguous().numpy().tobytes()).hexdigest()
            f.write(json.dumps({"epoch": int(e), "index": int(i), "sha256": digest}) + "\n")


def _dense(found, num_classes: int) -> torch.Tensor:
    from pretrain.teacher_store import dense_targets

    return dense_targets(found.probs, found.indices, num_classes)


_TEACHERS: dict = {}
_WITHOUT_TEACHER = False


@contextlib.contextmanager
def without_teacher():
    """Build distill objectives of finished runs without their teacher or store (pretrain.export's
    load_checkpoint_model: exporting or probing a student must not need the teacher, nor a store that is gone).
    The run's config.yaml holds the resolved num_classes and teacher_feature_dim this needs."""
    global _WITHOUT_TEACHER
    old, _WITHOUT_TEACHER = _WITHOUT_TEACHER, True
    try:
        yield
    finally:
        _WITHOUT_TEACHER = old


def _cached_teacher(cfg: DistillConfig, data):
    """Load once per process (load_config checks the config by building it, then the run builds it again)."""
    key = json.dumps(
        [
            cfg.teacher,
            cfg.teacher_weights,
            cfg.teacher_kwargs,
            cfg.teacher_image_size,
            cfg.teacher_mean,
            cfg.teacher_std,
            list(student_input(data).as_dict().items()),
        ],
        sort_keys=True,
        default=str,
    )
    if key not in _TEACHERS:
        with torch.device("cpu"):  # check_config builds objectives on the meta device: the teacher is real
            _TEACHERS[key] = load_configured_teacher(cfg, data)
    return _TEACHERS[key]


def _open_store(cfg: DistillConfig, data, seed: int, teacher):
    """The store, checked against this run: teacher, data, augmentation, seed, temperature, k."""
    from pretrain.teacher_store import TeacherStore, compare, data_identity

    store = TeacherStore(cfg.teacher_outputs, seed)
    meta, where = store.meta, f"{cfg.teacher_outputs}/store.json"
    ident = data_identity(data, data.local_dir(), meta["data"]["samples"])
    if ident["shards_index_sha256"] is None:
        ident.pop("shards_index_sha256")  # shards not converted yet: the sample count is checked per lookup
    compare(meta, {"data": ident, "seed": seed, "temperature": cfg.temperature}, where)
    if teacher is not None:
        compare(
            meta["teacher"], {"fingerprint": teacher.fingerprint, "input": teacher.input.as_dict()}, where
        )
    if cfg.num_classes and cfg.num_classes != store.num_classes:
        raise ConfigError(
            f"objective.num_classes: {cfg.num_classes}, but {where} holds a {store.num_classes}-class teacher"
        )
    return store
