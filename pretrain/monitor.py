"""Online monitors every `eval.interval` steps: kNN and linear-probe accuracy of an image backbone's features;
zero-shot accuracy and image<->text retrieval of a two-tower image-text model.

Image backbones: the eval images are fixed: the first `eval.train_samples` of the train split (the kNN bank and
the probe's training set) and the first `eval.test_samples` of the test split (scored), normalized as training
normalizes, loaded once. Features and scores come from pretrain.probe, the offline probe's own code.

Two-tower models (`modality == "image_text"`, `encode_image` / `encode_text`): the first `eval.test_samples`
pairs of the test split (images and their tokenized captions) and the class prompts (each class name under
each of `eval.templates`, tokenized as captions are) are embedded; every rank then scores zero-shot top-1/top-5
(class embeddings: the mean over templates, renormalized) and recall@1/5/10 both ways (pretrain.zeroshot), and
draws the similarity matrix of the first 16 pairs (`Monitor.pictures`, logged by rank 0).

Distributed, without deadlocks (the bugs of open_clip #1121/#1152 and of lightly's kNN callback):
  - the inputs are cut into chunks of `eval.batch_size` (images: train then test; pairs: images, captions and
    prompts, one after the other); chunk j is embedded by rank j % world (`Shards`), so every chunk has the
    same contents on 1 or N ranks and its features are the same bits;
  - every rank runs the same number of forwards (a rank out of chunks embeds a dummy image and drops it): under
    ZeRO-3 each forward gathers parameters collectively, so ranks must stay in lockstep;
  - the features are all-gathered (padded to equal rows), then every rank scores the same tensors on CPU. Nothing
    collective sits in a rank-0-only branch; rank 0's logger alone writes.
The forward runs as training runs (the engine's unwrapped module, eval mode, no grad, bf16 as the engine does it)
with the RNG forked and restored: a run with eval on trains bit-identically to one with eval off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from pretrain import probe
from pretrain.config import Config, ConfigError
from pretrain.dist import DistContext

log = logging.getLogger("tessera")


def check_eval_config(cfg: Config) -> None:
    """What only the model and the datasets can say about the eval section (Config.validate checks the rest):
    image backbones need a labelled image dataset, two-tower models an image-text dataset with a test split,
    and both something to score."""
    from pretrain.build import model_modality
    from pretrain.data.sources import get_dataset

    e = cfg.eval
    if e.interval <= 0:
        return
    modality = model_modality(cfg.model.name)
    if modality == "text":
        raise ConfigError(
            f"eval.interval: {e.interval}, but model.name {cfg.model.name!r} is a text model; the online monitors "
            "score image features (text runs: python -m pretrain.text_eval). Set eval.interval=0"
        )
    pairs = modality == "image_text"
    if not pairs and not (e.knn or e.linear_probe):
        raise ConfigError(
            f"eval.interval: {e.interval}, but eval.knn and eval.linear_probe are both false: nothing to score"
        )
    if pairs and not (e.zero_shot or e.retrieval):
        raise ConfigError(
            f"eval.interval: {e.interval}, but eval.zero_shot and eval.retrieval are both false: nothing to score"
        )
    name = e.dataset or cfg.data.dataset
    key = "eval.dataset" if e.dataset else "data.dataset"
    try:
        source = get_dataset(name)
    except KeyError as err:
        raise ConfigError(f"{key}: {err.args[0]}") from err
    has_test = "test" in (source.splits or ("test",))
    if not pairs and (source.modality != "image" or not has_test):
        raise ConfigError(
            f"{key}: the monitors need a labelled image dataset with a test split; {name!r} is not"
        )
    if pairs and (source.modality != "image_text" or not has_test):
        raise ConfigError(
            f"{key}: zero-shot and retrieval of {cfg.model.name!r} need an image-text dataset with a test "
            f"split; {name!r} is not (python -m pretrain.data list)"
        )
    if pairs and e.zero_shot and "label" not in source.fields:
        raise ConfigError(
            f"eval.zero_shot: {name!r} ({key}) has no classes to classify into; set eval.zero_shot=false "
            "(retrieval alone) or evaluate on a dataset with labels"
        )


def is_two_tower(module: nn.Module) -> bool:
    """A two-tower image-text model (models/two_tower.py's interface): scored by zero-shot and retrieval."""
    return getattr(module, "modality", None) == "image_text" and all(
        hasattr(module, name) for name in ("encode_image", "encode_text")
    )


def _rng_kept(device: torch.device):
    """Every random stream (torch CPU and this device, numpy, python) as it was, whatever happens inside."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
    py, npy = random.getstate(), np.random.get_state()
    stack.callback(lambda: (random.setstate(py), np.random.set_state(npy)))
    return stack


@contextlib.contextmanager
def _frozen(module: nn.Module, device: torch.device):
    """Eval mode (train mode back after), no grad, every random stream restored: training cannot tell."""
    was = module.training
    module.eval()
    try:
        with _rng_kept(device), torch.no_grad():
            yield
    finally:
        module.train(was)


def _main_first(ctx: DistContext, what: str, load):
    """`load()` on rank 0 first (it may convert shards), then on the others; an error on rank 0 raises on every
    rank rather than leaving them waiting in the broadcast forever."""
    result = None
    if ctx.is_main:
        try:
            result = load()
        except Exception as err:
            ctx.broadcast_object(f"{type(err).__name__}: {err}")
            raise
    error = ctx.broadcast_object(None)
    if error is not None:
        raise RuntimeError(f"eval: rank 0 could not load {what}: {error}")
    return load() if result is None else result


class Shards:
    """A fixed input tensor (N, ...) embedded in lockstep on every rank: chunk j (rows [j*b, j*b + sizes[j]) for
    b = `batch`) is embedded by rank j % world; every rank runs `rounds` forwards (a rank out of chunks embeds a
    dummy row and drops it: under ZeRO-3 each forward gathers parameters collectively); the outputs are
    all-gathered and put back in row order, the same tensor on every rank."""

    def __init__(self, x: torch.Tensor, batch: int, ctx: DistContext):
        n, self.ctx = len(x), ctx
        self.sizes = [min(batch, n - s) for s in range(0, n, batch)]
        self.rounds = math.ceil(len(self.sizes) / ctx.world_size)  # forwards per rank, the same on every rank
        mine = range(ctx.rank, len(self.sizes), ctx.world_size)
        # this rank's share only (copies: views would keep every input alive on every rank)
        self.chunks = {j: x[j * batch : j * batch + self.sizes[j]].clone() for j in mine}
        self.dummy = x[:1].clone()  # what a rank out of chunks embeds, to keep in step with the others

    def embed(self, fn, gather=None) -> torch.Tensor:
        """fn(chunk) -> (b, ...) for every chunk -> (N, ...) fp32 on CPU. Collective: every rank calls it
        together. `gather`: a replacement for `self.gather` (tests)."""
        w, mine = self.ctx.world_size, []
        for r in range(self.rounds):
            j = r * w + self.ctx.rank
            out = fn(self.chunks[j] if j in self.chunks else self.dummy).float()
            if j in self.chunks:
                mine.append(out)
        local = torch.cat(mine) if mine else out.new_zeros(0, *out.shape[1:])  # (rows of this rank, ...)
        parts = (gather or self.gather)(local)  # [rank r's rows] for every r
        chunks, offset = [], [0] * w
        for j, size in enumerate(self.sizes):  # rank r's rows are its chunks r, r + world, ... in order
            r = j % w
            chunks.append(parts[r][offset[r] : offset[r] + size])
            offset[r] += size
        return torch.cat(chunks).cpu()  # (N, ...)

    def gather(self, local: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's rows (all_gather needs equal shapes: padded to the largest share, cut back after)."""
        w = self.ctx.world_size
        if not self.ctx.distributed:
            return [local]
        rows = [sum(self.sizes[r::w]) for r in range(w)]
        padded = local.new_zeros(max(rows), *local.shape[1:])
        padded[: len(local)] = local
        out = [torch.empty_like(padded) for _ in range(w)]
        dist.all_gather(out, padded)
        return [t[:n] for t, n in zip(out, rows)]


class PairEval:
    """Zero-shot and retrieval scores of a two-tower model on fixed held-out pairs, the same on every rank.

    `pairs`: images (N, C, S, S), input_ids (N, L), attention_mask (N, L), labels (N,) or None (a
    pretrain.data.split.PairSplit); `prompts`: (input_ids, attention_mask) (C * T, L) of the class-major prompts
    (pretrain.zeroshot.prompts), or None without eval.zero_shot. Without eval.retrieval only the first 16 captions
    are embedded (the picture's). `e`: the EvalConfig; `input_dtype`: the images' dtype (DeepSpeed bf16)."""

    PICTURE_PAIRS = 16  # the similarity picture: the first 16 pairs

    def __init__(self, ctx, tower, pairs, prompts, n_classes: int, n_templates: int, e, input_dtype=None):
        self.ctx, self.tower, self.e, self.input_dtype = ctx, tower, e, input_dtype
        self.labels, self.n_classes, self.n_templates = pairs.labels, n_classes, n_templates
        self.n = len(pairs.images)
        b = e.batch_size
        self.images = Shards(pairs.images, b, ctx)
        # retrieval off: only the picture's captions are embedded
        keep = self.n if e.retrieval else min(self.n, self.PICTURE_PAIRS)
        ids, mask = pairs.input_ids[:keep], pairs.attention_mask[:keep]  # (N', L) each
        text = torch.stack([ids, mask.to(ids.dtype)], 1)  # (N', 2, L)
        self.captions = Shards(text, b, ctx)
        self.prompts = None
        if e.zero_shot:
            ids, mask = prompts  # (C * T, L) each
            self.prompts = Shards(torch.stack([ids, mask.to(ids.dtype)], 1), b, ctx)  # (C * T, 2, L)
        self.topk = (1, 5) if n_classes >= 5 else (1,)

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.ctx.device, dtype=self.input_dtype or x.dtype)
        return self.tower.encode_image(x)  # (b, E), normalized

    def _text(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.ctx.device)  # (b, 2, L): ids, mask
        return self.tower.encode_text(x[:, 0], x[:, 1])  # (b, E), normalized

    def embeddings(self, forward=None) -> dict[str, torch.Tensor]:
        """{"image" (N, E), "text" (N', E), ["class" (C, E)]}: fp32 on CPU on every rank. Collective: every rank
        calls it together; the order of the forwards (images, captions, prompts) is the same on every rank.
        `forward(fn) -> fn'` wraps each tower call (the monitor's precision); the caller sets mode and grad."""
        from pretrain.zeroshot import template_mean

        wrap = forward or (lambda fn: fn)
        out = {
            "image": self.images.embed(wrap(self._image)),
            "text": self.captions.embed(wrap(self._text)),
        }
        if self.prompts is not None:
            prompt_emb = self.prompts.embed(wrap(self._text))  # (C * T, E)
            out["class"] = template_mean(prompt_emb, self.n_classes, self.n_templates)  # (C, E)
        return out

    def score(self, emb: dict[str, torch.Tensor]) -> tuple[dict[str, float], torch.Tensor]:
        """({"zeroshot_top1", ["zeroshot_top5"], "i2t_R@1", ..., "t2i_R@10"}, the picture (3, H, W) in [0, 1])."""
        from pretrain import zeroshot

        out = {}
        if self.prompts is not None:
            acc = zeroshot.zero_shot_accuracy(emb["image"], emb["class"], self.labels, self.topk)
            out.update({f"zeroshot_{k}": v for k, v in acc.items()})
        if self.e.retrieval:
            out.update(zeroshot.retrieval_recall(emb["image"], emb["text"]))
        m = min(self.n, self.PICTURE_PAIRS)
        picture = zeroshot.similarity_picture(emb["image"][:m], emb["text"][:m])  # (H, W, 3) uint8
        return out, picture.permute(2, 0, 1).float() / 255  # (3, H, W)

    def chance(self) -> dict[str, float]:
        from pretrain.zeroshot import chance_levels

        c = chance_levels(self.n, self.n_classes if self.prompts is not None else None, topk=self.topk)
        return {k if "R@" in k else f"zeroshot_{k}": v for k, v in c.items()}


class Monitor:
    """Built once per run on every rank (`Monitor(cfg, ctx, engine.module)`); `due(step)` says when to call
    `evaluate(step, train_time)`, which every rank must call at the same steps. After an evaluation of a
    two-tower model, `pictures` holds {name: (3, H, W) image in [0, 1]} for the logger (rank 0 writes)."""

    def __init__(self, cfg: Config, ctx: DistContext, module: nn.Module):
        check_eval_config(cfg)
        e = cfg.eval
        self.cfg, self.ctx, self.module = cfg, ctx, module
        self.encoder = getattr(module, "backbone", module)  # an objective's backbone, or a bare backbone
        self.dataset = e.dataset or cfg.data.dataset
        self.eval_time = 0.0  # seconds spent evaluating in this process
        self.pictures: dict[str, torch.Tensor] = {}
        # the engine's precision (pretrain/engine/*.py): torch autocasts; DeepSpeed holds bf16 weights, bf16 inputs
        bf16 = cfg.engine.precision == "bf16"
        self.autocast = bf16 and cfg.engine.backend == "torch"
        self.input_dtype = torch.bfloat16 if bf16 and cfg.engine.backend == "deepspeed" else None
        self.pairs = None
        if is_two_tower(self.encoder):
            self.pairs = self._load_pairs()
            return

        train_x, self.train_y, test_x, self.test_y = self._load()
        images = torch.cat([train_x, test_x])  # (N, C, S, S): the train bank, then the test images
        self.n_train = len(self.train_y)
        self.shards = Shards(images, e.batch_size, ctx)
        self.sizes, self.rounds, self.chunks = self.shards.sizes, self.shards.rounds, self.shards.chunks

    def _load(self):
        """The fixed eval splits; rank 0 loads first (it may convert shards), the others then read them."""
        e, d = self.cfg.eval, self.cfg.data
        own = (
            self.dataset == d.dataset and d.split == "train" and not (d.streams or d.remote or d.max_samples)
        )
        local = d.local if own else None  # the run's own train shards, when that is what they are
        size = self.encoder.hparams()["img_size"]

        def load():
            return probe.load_eval_images(
                dataclasses.asdict(d), self.dataset, size, e.train_samples, e.test_samples, local=local
            )

        splits = _main_first(self.ctx, f"the {self.dataset!r} eval images", load)
        log.info(
            "eval every %d steps on %s: %d train / %d test images",
            self.cfg.eval.interval,
            self.dataset,
            len(splits[1]),
            len(splits[3]),
        )
        return splits

    def _read_pairs(self):
        """(the test pairs (pretrain.data.split.PairSplit), the class-major prompts' (ids, mask) or None, class
        names or None): single process, may convert shards."""
        from pretrain import zeroshot
        from pretrain.build import tokenizer_of
        from pretrain.data.image_text import tokenize_captions
        from pretrain.data.split import load_pairs

        e, d = self.cfg.eval, self.cfg.data
        data = d  # the run's dataset: its tokenizer, image size, normalization, text_len and source
        if self.dataset != d.dataset:  # another one: its own normalization and source, the run's tokenizer
            data = dataclasses.replace(
                d, dataset=self.dataset, source=None, local=None, remote=None, streams=[], max_samples=None
            )
            data.mean = data.std = None
        pairs = load_pairs(data, "test", e.test_samples, source=e.source)
        if not e.zero_shot:
            return pairs, None, None
        names = e.class_names or pairs.class_names
        texts = zeroshot.prompts(names or [], e.templates)
        ids, mask, truncated = tokenize_captions(texts, tokenizer_of(self.cfg), d.text_len)
        if truncated:
            log.warning(
                "eval: %d of %d zero-shot prompts are longer than data.text_len=%d and are truncated",
                truncated,
                len(texts),
                d.text_len,
            )
        return pairs, (ids, mask), names

    def _load_pairs(self) -> PairEval:
        from pretrain.data.sources import get_dataset
        from pretrain.zeroshot import check_class_names

        e = self.cfg.eval
        info = get_dataset(self.dataset)
        if e.source is None and info.needs_source and info.splits is None:
            log.warning(
                "eval: the test pairs of %r are read from data.source; if that is the training folder, the "
                "scores are on training pairs: set eval.source to the held-out ones",
                self.dataset,
            )
        pairs, prompts, names = _main_first(self.ctx, f"the {self.dataset!r} test pairs", self._read_pairs)
        n_classes = 0
        if e.zero_shot:  # every rank raises alike: they loaded the same data
            key = "eval.class_names" if e.class_names else ("eval.dataset" if e.dataset else "data.dataset")
            if pairs.labels is None:
                raise ConfigError(f"eval.zero_shot: the {self.dataset!r} test pairs have no labels")
            if names is None:
                raise ConfigError(
                    f"eval.class_names: {self.dataset!r} gives no class names; list them, in label order"
                )
            check_class_names(names, key)
            n_classes, top = len(names), int(pairs.labels.max())
            if top >= n_classes or (
                e.class_names and pairs.class_names and n_classes != len(pairs.class_names)
            ):
                raise ConfigError(
                    f"{key}: {n_classes} class names, but {self.dataset!r} has "
                    f"{len(pairs.class_names) if pairs.class_names else top + 1} classes"
                )
        log.info(
            "eval every %d steps on %s: %d test pairs%s",
            e.interval,
            self.dataset,
            len(pairs.images),
            f", {n_classes} classes x {len(e.templates)} templates" if e.zero_shot else "",
        )
        return PairEval(
            self.ctx, self.encoder, pairs, prompts, n_classes, len(e.templates), e, self.input_dtype
        )

    def due(self, step: int) -> bool:
        """Every eval.interval steps and at the run's last step (train.max_steps), on every rank alike."""
        i = self.cfg.eval.interval
        return i > 0 and (step % i == 0 or step == self.cfg.train.max_steps)

    def _precision(self, fn):
        """fn run as the engine runs its forwards: under bf16 autocast for the torch engine."""

        def run(*args):
            cast = torch.autocast(self.ctx.device.type, dtype=torch.bfloat16) if self.autocast else None
            with cast or contextlib.nullcontext():
                return fn(*args)

        return run

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.ctx.device, dtype=self.input_dtype or images.dtype)
        return self._precision(probe.embed)(self.encoder, x).float()  # (b, D)

    def _gather(self, local: torch.Tensor) -> list[torch.Tensor]:
        return self.shards.gather(local)

    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train features (N_train, D), test features (N_test, D)): fp32 on CPU, in sample order, on every
        rank. Collective: every rank calls it together."""
        with _frozen(self.module, self.ctx.device):
            feats = self.shards.embed(self._embed, self._gather)  # (N, D)
        return feats[: self.n_train], feats[self.n_train :]

    def pair_embeddings(self) -> dict[str, torch.Tensor]:
        """Two-tower models: PairEval.embeddings in eval mode, no grad, RNG kept. Collective."""
        with _frozen(self.module, self.ctx.device):
            return self.pairs.embeddings(self._precision)

    def evaluate(self, step: int, train_time: float) -> dict[str, float]:
        """The monitors' metrics at `step` ("eval/..."), the same on every rank; `train_time`: seconds this
        process has trained so far (for eval/time_fraction). Collective: every rank calls it at the same step."""
        t0 = time.perf_counter()
        if self.pairs is not None:
            scores, picture = self.pairs.score(self.pair_embeddings())
            self.pictures = {"eval/similarity": picture}
            out = {f"eval/{k}": v for k, v in scores.items()}
        else:
            out = self._score_images()
        dt = time.perf_counter() - t0
        self.eval_time += dt
        out["eval/time_s"] = dt
        out["eval/time_fraction"] = self.eval_time / max(train_time, 1e-9)
        log.info(
            "step %d eval on %s: %s (%.1fs; eval so far %.1f%% of train time)",
            step,
            self.dataset,
            self._summary(out),
            dt,
            100 * out["eval/time_fraction"],
        )
        return out

    def _score_images(self) -> dict[str, float]:
        e = self.cfg.eval
        train_x, test_x = self.features()
        out = {}
        if e.knn:
            out["eval/knn_top1"] = probe.knn_accuracy(
                train_x, self.train_y, test_x, self.test_y, e.k, e.temperature
            )
        if e.linear_probe:
            out["eval/linear_probe"] = probe.logistic_accuracy(train_x, self.train_y, test_x, self.test_y)
        return out

    def _summary(self, out: dict[str, float]) -> str:
        """The log line's scores; a two-tower model's with their chance levels."""
        if self.pairs is None:
            names = (("kNN top-1", "eval/knn_top1"), ("linear probe", "eval/linear_probe"))
            return ", ".join(f"{name} {out[key]:.4f}" for name, key in names if key in out)
        chance = self.pairs.chance()
        keys = ("zeroshot_top1", "zeroshot_top5", "i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")
        return ", ".join(
            f"{k.replace('_', ' ')} {out[f'eval/{k}']:.4f} (chance {chance[k]:.4f})"
            for k in keys
            if f"eval/{k}" in out
        )
