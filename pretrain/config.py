"""The one typed config tree: dataclasses loaded from YAML, overridden with `--set a.b=value`.

Unknown or mistyped keys fail before any work, naming the key and the nearest valid ones. The resolved
tree is written into the run directory and into every checkpoint (`to_yaml`).

A leaf: it imports no model, objective or builder. The objective's own section is parsed with the class the
caller passes (`from_dict(tree, objective_config)`); `pretrain.build.load_config` is the entry point that joins
the registries and checks what only building can check (model kwargs, shapes on the meta device).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain.data.config import DataConfig
from pretrain.errors import ConfigError

__all__ = ["Config", "ConfigError", "from_dict", "read_tree", "resolve_batch", "to_dict", "to_yaml"]


@dataclass
class RunConfig:
    output_dir: str = "runs/default"  # metrics, TensorBoard, images and checkpoints go here
    log_interval: int = 10  # steps between metrics.jsonl lines
    image_interval: int = 100  # steps between objective visuals (e.g. MAE reconstructions); 0 = never
    tensorboard: bool = True
    progress: bool = True  # progress bar with ETA on rank 0
    sample_log: bool = (
        False  # per-rank log of the sample ids of every step, under samples/ (pretrain.samplelog)
    )
    # Peak TFLOP/s of one device, the denominator of MFU; None = the GPU's bf16 data-sheet peak
    # (pretrain.mfu.GPU_PEAK_TFLOPS) or, on CPU, a matmul rate measured at start.
    peak_tflops: float | None = None


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16"  # a models registry name: models.list_models()
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor overrides, checked against the model
    grad_checkpointing: bool = False  # activation checkpointing of every block
    # Start from these weights: a Tessera run dir or checkpoint (any engine, any ZeRO stage) or a transformers
    # folder of a supported family. The backbone's weights are loaded (position embeddings interpolated to the
    # new size); the objective's heads start fresh (pretrain.init_from).
    init_from: str | None = None


@dataclass
class OptimConfig:
    lr: float = 1.5e-4  # peak learning rate (after warmup)
    min_lr: float = 0.0  # floor of the cosine/linear decay
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.05  # not applied to biases, norms, tokens and position embeddings
    layer_decay: float = 1.0  # layer-wise LR decay over the backbone's depth (group_matcher); 1.0 = off
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps of the whole run (sets the LR schedule)
    micro_batch_size: int = 64  # samples per rank per forward
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    # Samples per optimizer step over all ranks. When set, grad_accum_steps is derived from it and the world size
    # at launch, so a job requeued on another number of nodes keeps training the same batches (elastic resume).
    global_batch_size: int | None = None
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    stop_at_step: int | None = (
        None  # end this process after this step (checkpointed); the next launch resumes
    )


@dataclass
class CheckpointConfig:
    interval: int = 500  # steps between checkpoints (and one at the end)
    keep_last: int = 2  # older checkpoints are deleted
    resume: bool = (
        True  # resume from the latest checkpoint in run.output_dir; false refuses a dir that has some
    )


@dataclass
class GuardConfig:
    """Loss guard: a non-finite or spiking loss rolls the run back to its last checkpoint and skips that batch."""

    enabled: bool = True
    spike_factor: float = 0.0  # a loss above this x its running mean is a spike; 0 = only non-finite losses
    spike_warmup: int = 20  # good steps of history before spikes are judged
    ema_decay: float = 0.9  # running mean of the loss: ema = decay * ema + (1 - decay) * loss
    max_retries: int = 3  # rollbacks in a row (no new checkpoint in between) before the run gives up


@dataclass
class EvalConfig:
    """Online monitors on a fixed held-out split (pretrain.monitor): every rank embeds its share, the features
    are gathered, and every rank scores the same numbers. An image backbone gets kNN / linear-probe accuracy; a
    two-tower image-text model zero-shot accuracy and image<->text retrieval (pretrain.zeroshot)."""

    interval: int = 0  # steps between evaluations (and one at the last step); 0 = never
    knn: bool = True  # k-nearest-neighbour accuracy (cosine, temperature-weighted vote)
    linear_probe: bool = True  # a logistic-regression probe fit on `train_samples` training images
    # A labelled image dataset to evaluate on (an image-text one for two-tower models); None = data.dataset
    dataset: str | None = None
    train_samples: int = 2000  # a fixed subset of the train split (the kNN bank and the probe's training set)
    test_samples: int = 1000  # a fixed subset of the test split (scored; two-tower runs: the held-out pairs)
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256  # images (or captions, prompts) per forward while embedding
    # Two-tower models: zero-shot classification of the test images among the classes, each class embedded as
    # the mean over `templates` ("{}" = the class name) of its prompts' text embeddings, renormalized.
    zero_shot: bool = True
    retrieval: bool = True  # two-tower models: image->text and text->image recall@1/5/10 over the test pairs
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}.", "a {}."])
    class_names: list[str] | None = None  # the classes' names in label order; None = the dataset's
    # Raw input of the held-out pairs (the test split's folder for image_captions, whose data.source is one
    # split); None = data.source for the run's own dataset, the dataset's default for another.
    source: str | None = None


@dataclass
class EngineConfig:
    backend: str = "torch"  # torch (DDP, the reference) | deepspeed
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    precision: str = "fp32"  # fp32 | bf16
    offload_optimizer: bool = False  # DeepSpeed: optimizer state in CPU memory (ZeRO >= 1)
    offload_params: bool = False  # DeepSpeed: parameters in CPU memory (ZeRO 3)


@dataclass
class Config:
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: Any = None  # the registered objective's own Config dataclass, chosen by `objective.name`
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def validate(self) -> Config:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{key}: {msg}")

        need(
            self.engine.backend in ("torch", "deepspeed"), "engine.backend", "must be 'torch' or 'deepspeed'"
        )
        need(self.engine.zero_stage in (0, 1, 2, 3), "engine.zero_stage", "must be 0, 1, 2 or 3")
        need(self.engine.precision in ("fp32", "bf16"), "engine.precision", "must be 'fp32' or 'bf16'")
        need(
            self.engine.backend == "deepspeed" or self.engine.zero_stage == 0,
            "engine.zero_stage",
            "ZeRO needs engine.backend=deepspeed",
        )
        need(
            not (self.engine.offload_optimizer or self.engine.offload_params)
            or self.engine.backend == "deepspeed",
            "engine.offload_optimizer",
            "offload needs engine.backend=deepspeed",
        )
        need(
            not self.engine.offload_params or self.engine.zero_stage == 3,
            "engine.offload_params",
            "parameter offload needs engine.zero_stage=3",
        )
        need(
            not self.engine.offload_optimizer or self.engine.zero_stage >= 1,
            "engine.offload_optimizer",
            "optimizer offload needs engine.zero_stage >= 1",
        )
        need(
            not (
                self.engine.backend == "deepspeed"
                and self.engine.zero_stage == 0
                and self.engine.precision == "bf16"
            ),
            "engine.zero_stage",
            "DeepSpeed bf16 at stage 0 keeps its fp32 master weights where export cannot consolidate them; "
            "use engine.zero_stage >= 1 (or engine.backend=torch)",
        )
        need(self.seed >= 0, "seed", "must be >= 0 (it seeds the data shuffle)")
        need(
            self.train.stop_at_step is None or self.train.stop_at_step >= 1,
            "train.stop_at_step",
            "must be >= 1 (or null)",
        )
        need(self.train.max_steps > 0, "train.max_steps", "must be > 0")
        need(self.train.micro_batch_size > 0, "train.micro_batch_size", "must be > 0")
        need(self.train.grad_accum_steps > 0, "train.grad_accum_steps", "must be > 0")
        need(
            self.train.global_batch_size is None or self.train.global_batch_size > 0,
            "train.global_batch_size",
            "must be > 0 (or null)",
        )
        need(self.train.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        need(self.checkpoint.interval > 0, "checkpoint.interval", "must be > 0")
        need(self.checkpoint.keep_last > 0, "checkpoint.keep_last", "must be > 0")
        need(self.run.log_interval > 0, "run.log_interval", "must be > 0")
        need(self.eval.interval >= 0, "eval.interval", "must be >= 0 (0 = never)")
        need(self.eval.k >= 1, "eval.k", "must be >= 1")
        need(self.eval.temperature > 0, "eval.temperature", "must be > 0")
        need(self.eval.train_samples >= 2, "eval.train_samples", "must be >= 2")
        need(self.eval.test_samples >= 1, "eval.test_samples", "must be >= 1")
        need(self.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
        need(len(self.eval.templates) > 0, "eval.templates", "must hold at least one template")
        for i, t in enumerate(self.eval.templates):
            bare = t.count("{}") == 1 and not set("{}") & set(t.replace("{}", "", 1))  # str.format-safe
            need(bare, f"eval.templates[{i}]", f"{t!r}: needs one '{{}}' (the class name), no other braces")
        names = self.eval.class_names
        if names is not None:
            dup = sorted({n for n in names if names.count(n) > 1})
            need(len(names) > 0, "eval.class_names", "the class list is empty (null = the dataset's)")
            need(not dup, "eval.class_names", f"duplicated class names {dup}: each needs a distinct name")
        need(
            self.run.peak_tflops is None or self.run.peak_tflops > 0,
            "run.peak_tflops",
            "must be > 0 (or null)",
        )
        need(
            self.guard.spike_factor == 0 or self.guard.spike_factor > 1,
            "guard.spike_factor",
            "must be 0 or > 1",
        )
        need(self.guard.spike_warmup >= 0, "guard.spike_warmup", "must be >= 0")
        need(0.0 <= self.guard.ema_decay < 1.0, "guard.ema_decay", "must be in [0, 1)")
        need(self.guard.max_retries >= 0, "guard.max_retries", "must be >= 0")
        need(
            self.optim.schedule in ("cosine", "linear", "constant"),
            "optim.schedule",
            "must be cosine, linear or constant",
        )
        need(len(self.optim.betas) == 2, "optim.betas", "must be two numbers")
        need(0.0 < self.optim.layer_decay <= 1.0, "optim.layer_decay", "must be in (0, 1] (1.0 = off)")
        need(
            0 <= self.optim.warmup_steps <= self.train.max_steps,
            "optim.warmup_steps",
            "must be between 0 and train.max_steps",
        )
        try:
            self.data.validate()
        except ValueError as e:
            raise ConfigError(str(e) if str(e).startswith("data.") else f"data: {e}") from e
        if hasattr(self.objective, "validate"):
            self.objective.validate()
        return self


def resolve_batch(cfg: Config, world_size: int) -> None:
    """Derive train.grad_accum_steps from train.global_batch_size and the world size, in place."""
    t = cfg.train
    if t.global_batch_size is None:
        return
    per_pass = t.micro_batch_size * world_size
    if t.global_batch_size % per_pass:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of train.micro_batch_size "
            f"({t.micro_batch_size}) x {world_size} ranks"
        )
    t.grad_accum_steps = t.global_batch_size // per_pass


# --- loading -------------------------------------------------------------------------------------------


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        t = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            out += _all_keys(t, key + ".")
    return out


def _unknown(key: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" Nearest valid keys: {', '.join(near)}." if near else ""
    return ConfigError(f"unknown config key {key!r}.{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            full = prefix + key
            while (
                isinstance(value, dict) and len(value) == 1
            ):  # name the leaf the user wrote: trian.max_steps
                ((sub, value),) = value.items()
                full += f".{sub}"
            raise _unknown(full, [prefix + k for k in _all_keys(cls)])
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _objective_config(data: dict | None, objective_config: Callable[[str], type], prefix: str = "objective"):
    data = dict(data or {})
    name = data.pop("name", None)
    try:
        cls = objective_config(name)
    except KeyError as e:
        raise ConfigError(f"{prefix}.name: {e.args[0]}") from e
    return _build(cls, data, prefix + ".")


def set_key(tree: dict, dotted: str, value: Any) -> None:
    """tree['a']['b'] = value for 'a.b', creating mappings on the way."""
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[: i + 1])} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train.max_steps=100")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def from_dict(tree: dict, objective_config: Callable[[str], type]) -> Config:
    """A parsed (not yet validated) Config; `objective_config(name)` is the registered objective's Config class
    (KeyError naming the registered ones for an unknown or missing name)."""
    tree = dict(tree or {})
    objective = tree.pop("objective", None)
    cfg = _build(Config, tree)
    cfg.objective = _objective_config(objective, objective_config)
    return cfg


def read_tree(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """YAML file + `key=value` overrides -> the raw tree (a dict). Raises ConfigError naming the file or key."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        tree = yaml.safe_load(p.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    for text in overrides:
        key, value = parse_override(text)
        set_key(tree, key, value)
    return tree


def to_dict(cfg: Config) -> dict:
    """The tree `from_dict` reads back; the objective's section names it (`registered_name`, set by its registry)."""
    out = dataclasses.asdict(cfg)
    name = getattr(type(cfg.objective), "registered_name", None)
    if name is None:
        raise TypeError(f"{type(cfg.objective).__name__} is not a registered objective's Config")
    out["objective"] = {"name": name, **dataclasses.asdict(cfg.objective)}
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
