"""Config -> the trained module (an objective wrapping a registered backbone), and the config entry point that
joins the registries: `load_config` parses with the objectives' Config classes and checks what only the model can
check (its kwargs, its shapes on the meta device, the tokenizer against the vocabulary)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

import models
from pretrain import config as config_tree
from pretrain.config import Config, ConfigError
from pretrain.data.sources import get_dataset
from pretrain.objectives import OBJECTIVES, build_objective, objective_config, objectives_for


def model_modality(name: str) -> str:
    """ "image" (a backbone), "text" (models/text_layers.py) or "image_text" (models/two_tower.py)."""
    return getattr(models.MODELS.get(name).builds, "modality", "image")


def is_text_model(name: str) -> bool:
    """Whether registered model `name` is a text family (modality "text": token ids in, models/text_layers.py)."""
    return model_modality(name) == "text"


def tokenizer_of(cfg: Config):
    """The run's TokenizerInfo (pretrain.data), or None for image data."""
    from pretrain.data.tokenizer import tokenizer_info

    return tokenizer_info(cfg.data)


def model_kwargs(cfg: Config) -> dict:
    """The backbone's constructor arguments: the config's, plus what the data decides unless the config says."""
    kwargs = dict(cfg.model.kwargs)
    if model_modality(cfg.model.name) == "image_text":
        return _two_tower_kwargs(cfg, kwargs)
    if is_text_model(cfg.model.name):
        info = tokenizer_of(cfg)
        if info is None:
            raise ConfigError(
                f"model.name: {cfg.model.name!r} is a text model but data.dataset {cfg.data.dataset!r} holds no text"
            )
        kwargs.setdefault("vocab_size", info.vocab_size)
        return kwargs
    kwargs.setdefault("in_chans", get_dataset(cfg.data.dataset).channels)
    kwargs.setdefault("img_size", cfg.data.image_size)
    # what the objective needs built into the backbone (SimMIM: a learned mask token), unless the config says
    for key, value in getattr(
        OBJECTIVES.get(type(cfg.objective).registered_name), "backbone_kwargs", {}
    ).items():
        kwargs.setdefault(key, value)
    return kwargs


def _two_tower_kwargs(cfg: Config, kwargs: dict) -> dict:
    """A two-tower model takes its image size and channels from the data, its vocabulary, context length and
    end-of-text / padding ids from the run's tokenizer (unless model.kwargs says)."""
    source = get_dataset(cfg.data.dataset)
    info = tokenizer_of(cfg)
    if source.modality != "image_text" or info is None:
        raise ConfigError(
            f"model.name: {cfg.model.name!r} is an image-text model but data.dataset {cfg.data.dataset!r} holds "
            f"{source.modality}, not image-text pairs (python -m pretrain.data list)"
        )
    kwargs.setdefault("in_chans", source.channels)
    kwargs.setdefault("img_size", cfg.data.image_size)
    kwargs.setdefault("vocab_size", info.vocab_size)
    kwargs.setdefault("context_length", cfg.data.text_len)
    kwargs.setdefault("eos_token_id", info.eos_id)
    kwargs.setdefault("pad_token_id", info.padding_id)
    return kwargs


def build_model(cfg: Config) -> nn.Module:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every restart
    kwargs = model_kwargs(cfg)
    backbone = models.create_model(cfg.model.name, **kwargs)
    if cfg.model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    tokenizer = tokenizer_of(cfg) if is_text_model(cfg.model.name) else None
    return build_objective(cfg.objective, backbone, tokenizer=tokenizer, seed=cfg.seed, data=cfg.data)


def example_batch(cfg: Config, batch_size: int, device: torch.device | str = "cpu") -> dict:
    """A batch shaped like the loader's (values random), e.g. to count FLOPs on the meta device. Text: one
    document per row (the loader's packed rows have the same shapes)."""
    kwargs = model_kwargs(cfg)
    if model_modality(cfg.model.name) == "image_text":
        size, n = cfg.data.image_size, cfg.data.text_len
        return {
            "image": torch.randn(batch_size, kwargs["in_chans"], size, size, device=device),  # (B, C, S, S)
            "input_ids": torch.randint(0, kwargs["vocab_size"], (batch_size, n), device=device),  # (B, L)
            "attention_mask": torch.ones(batch_size, n, dtype=torch.long, device=device),  # (B, L)
            "index": torch.arange(batch_size, device=device),
            "epoch": torch.zeros(batch_size, dtype=torch.long, device=device),
        }
    if is_text_model(cfg.model.name):
        n = cfg.data.seq_len
        return {
            "input_ids": torch.randint(0, kwargs["vocab_size"], (batch_size, n), device=device),  # (B, N)
            "positions": torch.arange(n, device=device).expand(batch_size, n),  # (B, N)
            "doc_ids": torch.zeros(batch_size, n, dtype=torch.long, device=device),  # (B, N)
            "index": torch.arange(batch_size, device=device),
        }
    size = cfg.data.image_size
    return {
        "image": torch.randn(batch_size, kwargs["in_chans"], size, size, device=device),  # (B, C, S, S)
        "label": torch.zeros(batch_size, dtype=torch.long, device=device),
        "index": torch.arange(batch_size, device=device),
        "epoch": torch.zeros(batch_size, dtype=torch.long, device=device),
    }


def count_params(module: nn.Module) -> int:
    # under ZeRO-3 a rank holds an empty placeholder; DeepSpeed keeps the full size in ds_numel
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


# --- the config entry point --------------------------------------------------------------------------------


def from_dict(tree: dict) -> Config:
    """A raw tree (e.g. a run's config.yaml) -> Config, parsed with the registered objectives (not validated)."""
    return config_tree.from_dict(tree, objective_config)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """YAML file + `key=value` overrides -> validated Config. Raises ConfigError naming the key."""
    return check_config(from_dict(config_tree.read_tree(path, overrides)))


def check_config(cfg: Config) -> Config:
    """Config.validate() (its own fields, the data's, the objective's), then what needs the model registry:
    model.name and model.kwargs, text model vs tokenizer, a build on the meta device (no memory), and that
    model.init_from is a source pretrain.init_from can read."""
    cfg.validate()
    if cfg.model.init_from:
        from pretrain.init_from import check_source

        check_source(cfg)
    try:
        factory = models.MODELS.get(cfg.model.name)
    except KeyError as e:
        raise ConfigError(f"model.name: {e.args[0]}") from e
    try:
        models.check_kwargs(factory, cfg.model.kwargs, "model.kwargs")
    except TypeError as e:
        raise ConfigError(str(e)) from e
    if is_text_model(cfg.model.name):
        _check_text(cfg)
    if model_modality(cfg.model.name) == "image_text":
        _check_image_text(cfg)
    if cfg.eval.interval:
        from pretrain.monitor import check_eval_config

        check_eval_config(cfg)  # an image backbone, a labelled image dataset, something to score
    kwargs = model_kwargs(cfg)
    with torch.device("meta"):
        try:
            backbone = models.create_model(cfg.model.name, **kwargs)
        except (TypeError, ValueError) as e:
            keys = ", ".join(f"model.kwargs.{k}" for k in cfg.model.kwargs) or "model.name"
            size = (
                f"data.seq_len={cfg.data.seq_len}"
                if is_text_model(cfg.model.name)
                else f"data.image_size={cfg.data.image_size}"
            )
            raise ConfigError(f"model {cfg.model.name!r} cannot be built with {size} and {keys}: {e}") from e
        tokenizer = tokenizer_of(cfg) if is_text_model(cfg.model.name) else None
        name = type(cfg.objective).registered_name
        if not OBJECTIVES.get(name).supports(backbone):
            raise ConfigError(
                f"objective.name: {name!r} cannot train model.name {cfg.model.name!r} (family "
                f"{type(backbone).__name__}); objectives that can: {', '.join(objectives_for(backbone))}"
            )
        try:
            build_objective(cfg.objective, backbone, tokenizer=tokenizer, seed=cfg.seed, data=cfg.data)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"objective.name: {name!r} cannot train model.name {cfg.model.name!r}: {e}"
            ) from e
    return cfg


def _check_text(cfg: Config) -> None:
    """The tokenizer's ids must fit the model's vocabulary; a row must fit the configured position range."""
    info = tokenizer_of(cfg)
    if info is None:
        raise ConfigError(
            f"model.name: {cfg.model.name!r} is a text model but data.dataset {cfg.data.dataset!r} holds no text "
            "(text datasets: python -m pretrain.data list)"
        )
    kwargs = model_kwargs(cfg)
    if kwargs["vocab_size"] < info.vocab_size:
        raise ConfigError(
            f"model.kwargs.vocab_size: {kwargs['vocab_size']} is smaller than the tokenizer's vocabulary "
            f"({info.vocab_size} ids, {info.path or 'data.vocab_size'}); token ids would index past the embedding"
        )
    with torch.device("meta"):
        max_len = models.create_model(cfg.model.name, **kwargs).max_seq_len
    if cfg.data.seq_len > max_len:
        raise ConfigError(
            f"data.seq_len: {cfg.data.seq_len} tokens per row is beyond the {max_len} positions "
            f"{cfg.model.name!r} was configured for (model.kwargs.max_seq_len)"
        )


def _check_image_text(cfg: Config) -> None:
    """Pairs for a two-tower model, and the tokenizer's ids within the text tower's vocabulary."""
    kwargs = model_kwargs(cfg)  # raises naming data.dataset when it holds no pairs
    info = tokenizer_of(cfg)
    if kwargs["vocab_size"] < info.vocab_size:
        raise ConfigError(
            f"model.kwargs.vocab_size: {kwargs['vocab_size']} is smaller than the tokenizer's vocabulary "
            f"({info.vocab_size} ids, {info.path}); token ids would index past the embedding"
        )
    if kwargs["context_length"] < cfg.data.text_len:
        raise ConfigError(
            f"model.kwargs.context_length: {kwargs['context_length']} positions cannot hold data.text_len="
            f"{cfg.data.text_len} tokens per caption"
        )
