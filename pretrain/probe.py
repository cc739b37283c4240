"""Frozen-feature evaluation: how well do an image encoder's features separate the classes? Offline and online.

    python -m pretrain.probe PATH [--dataset fashion_mnist] [--train-samples N] [--test-samples N] [--json FILE]

PATH is an export folder (python -m pretrain.export), a Tessera run directory or one of its checkpoints, of any
image family. It prints the linear-probe and kNN test accuracy of the pretrained encoder, of a random-init
encoder of the same shape (same hyperparameters, seed 0) and of the raw pixels (the normalized images
flattened: the "no learning" baseline); all three go through exactly the same code.

This module is the one source of the features and scores that the online monitors (pretrain.monitor) log:
  - `embed`: ViT -> [cls token ‖ mean patch token] of the final normed tokens; every other family -> its pooled
    pre-logits `forward_head(forward_features(x), pre_logits=True)` (what its classifier reads);
  - `knn_accuracy`: DINO's weighted kNN (cosine similarity, k nearest, votes weighted exp(sim / T), top-1);
  - `logistic_accuracy`: multinomial logistic regression on standardized features (full-batch L-BFGS), its L2
    weight picked on a held-out fifth of the training set; deterministic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from models.vit import VisionTransformer

KNN_K, KNN_TEMPERATURE = 20, 0.07  # DINO's eval_knn defaults; pretrain.config.EvalConfig has the same


def embed(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """One batch's features (B, D), in the caller's mode, grad and precision (see `features`)."""
    if isinstance(encoder, VisionTransformer):
        tokens = encoder.forward_features(images)  # (B, P + L, D) after the final norm
        patches = tokens[:, encoder.num_prefix_tokens :]  # (B, L, D)
        return torch.cat([tokens[:, 0], patches.mean(1)], dim=1)  # (B, 2D)
    return encoder.forward_head(encoder.forward_features(images), pre_logits=True)  # (B, num_features)


@torch.no_grad()
def features(encoder: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Features (N, D) fp32 of `images` (N, C, S, S) in chunks of `batch`, in eval mode (restored after)."""
    was = encoder.training
    encoder.eval()
    try:
        return torch.cat(
            [embed(encoder, images[i : i + batch]).float() for i in range(0, len(images), batch)]
        )
    finally:
        encoder.train(was)


def load_eval_images(
    data: dict,
    dataset: str | None,
    image_size: int,
    train_samples: int | None,
    test_samples: int | None,
    local: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels): the first `train_samples` of the train split and
    the first `test_samples` of the test split of `dataset` (None: the run's), at `image_size`, unaugmented.

    `data` is the run's data section (a dict: DataConfig fields). On the run's own dataset the images are
    normalized as training normalized them (its mean, std and source); another dataset gets its own defaults.
    `local`: shards of the train split to read (the run's data.local), else the default directories.
    Single process (pretrain.data.load_split): in a multi-rank job let rank 0 call it first (it may convert).
    """
    from pretrain.data import load_split

    dataset = dataset or data.get("dataset")
    same = dataset == data.get("dataset")
    norm = {k: data.get(k) if same else None for k in ("mean", "std", "source")}
    train_x, train_y = load_split(
        dataset, "train", image_size, max_samples=train_samples, local=local, **norm
    )
    test_x, test_y = load_split(dataset, "test", image_size, max_samples=test_samples, **norm)
    return train_x, train_y, test_x, test_y


def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy of DINO's weighted kNN: each test feature's k most cosine-similar train features vote for
    their labels with weight exp(sim / temperature). Test rows go `chunk` at a time (memory: chunk x N_train)."""
    train = nn.functional.normalize(train_x.float(), dim=1)  # (N, D)
    test = nn.functional.normalize(test_x.float(), dim=1)  # (M, D)
    classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train))
    correct = 0
    for i in range(0, len(test), chunk):
        sim, idx = (test[i : i + chunk] @ train.T).topk(k, dim=1)  # (m, k) each
        votes = torch.zeros(len(sim), classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == test_y[i : i + chunk]).sum())
    return correct / len(test)


def _fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, full-batch L-BFGS (deterministic: no sampling)."""
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def logistic_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, seed: int = 0
) -> float:
    """Test accuracy of a logistic regression on standardized features; L2 picked on a held-out fifth."""
    train_x, test_x = train_x.float(), test_x.float()
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    k = int(max(train_y.max(), test_y.max())) + 1
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    val, fit = order[: len(order) // 5], order[len(order) // 5 :]

    def acc(w, b, x, y) -> float:
        return float(((x @ w + b).argmax(1) == y).float().mean())

    with torch.enable_grad():  # callers may hold no_grad; L-BFGS needs gradients of w and b
        best = max(
            (1e-4, 1e-3, 1e-2),
            key=lambda l2: acc(*_fit_logistic(train_x[fit], train_y[fit], k, l2), train_x[val], train_y[val]),
        )
        return acc(*_fit_logistic(train_x, train_y, k, best), test_x, test_y)


def random_like(encoder: nn.Module, seed: int = 0) -> nn.Module:
    """A freshly initialized encoder of the same class and hyperparameters (`hparams()`), seeded; eval()."""
    torch.manual_seed(seed)
    return type(encoder)(**encoder.hparams()).eval()


def load_encoder(path: str | Path) -> tuple[nn.Module, dict]:
    """(the image backbone, the run's meta with its data section) from an export folder, a run directory or a
    checkpoint folder."""
    from pretrain.export import from_hf, load_checkpoint_model

    path = Path(path)
    if (path / "tessera.json").is_file() or (path / "config.json").is_file():  # an export folder
        meta = json.loads((path / "tessera.json").read_text()) if (path / "tessera.json").is_file() else {}
        model = from_hf(path)
    else:
        model, meta = load_checkpoint_model(path)
    encoder = getattr(model, "backbone", model)
    if getattr(encoder, "modality", "image") != "image":
        raise ValueError(f"{path}: a text model; score it with python -m pretrain.text_eval")
    return encoder.eval(), meta


def score(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> dict[str, float]:
    """{"linear_probe": accuracy, "knn": accuracy} of one set of features (N, D) / (M, D)."""
    return {
        "linear_probe": logistic_accuracy(train_x, train_y, test_x, test_y),
        "knn": knn_accuracy(train_x, train_y, test_x, test_y, k, temperature),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.probe", description=__doc__.split("\n")[0])
    p.add_argument("path", help="export folder (python -m pretrain.export), run directory or checkpoint")
    p.add_argument("--dataset", default=None, help="default: the dataset the run trained on")
    p.add_argument("--train-samples", type=int, default=10000)
    p.add_argument("--test-samples", type=int, default=10000)
    p.add_argument("--k", type=int, default=KNN_K, help="neighbours of the kNN vote")
    p.add_argument("--temperature", type=float, default=KNN_TEMPERATURE, help="of the kNN vote weights")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    try:
        encoder, meta = load_encoder(args.path)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = meta.get("data", {})  # the run's data section: the probe reads images the way training did
    dataset = args.dataset or data.get("dataset", "fashion_mnist")
    t0 = time.time()
    train_x, train_y, test_x, test_y = load_eval_images(
        data, dataset, encoder.hparams()["img_size"], args.train_samples, args.test_samples
    )
    results: dict = {"dataset": dataset, "train_samples": len(train_y), "test_samples": len(test_y)}
    random_init = random_like(encoder)
    inputs = {
        "pretrained": lambda x: features(encoder, x),
        "random_init": lambda x: features(random_init, x),
        "raw_pixels": lambda x: x.flatten(1),  # (N, C*S*S): the normalized images themselves
    }
    for name, featurize in inputs.items():
        got = score(featurize(train_x), train_y, featurize(test_x), test_y, args.k, args.temperature)
        results[name], results[f"{name}_knn"] = got["linear_probe"], got["knn"]
    print(
        f"linear probe on {dataset} ({len(train_y)} train / {len(test_y)} test images, "
        f"{time.time() - t0:.0f}s):"
    )
    print(f"  pretrained encoder  ({args.path}): accuracy {results['pretrained']:.4f}")
    print(f"  random-init encoder (same shape):  accuracy {results['random_init']:.4f}")
    print(f"  {'test accuracy':<30}{'linear probe':>14}{f'kNN (k={args.k})':>14}")
    for name, label in (
        ("pretrained", "pretrained encoder"),
        ("random_init", "random-init encoder"),
        ("raw_pixels", "raw pixels (no learning)"),
    ):
        print(f"  {label:<30}{results[name]:>14.4f}{results[f'{name}_knn']:>14.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
