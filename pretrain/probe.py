"""Linear probe: how linearly separable are a frozen encoder's features? Pretrained vs random init, one run.

    python -m pretrain.probe HF_DIR [--dataset fashion_mnist] [--train-samples N] [--test-samples N]

Features are [cls token ‖ mean patch token] of the final layer, standardized with training statistics; the
classifier is multinomial logistic regression (full-batch L-BFGS) whose L2 weight is picked on a
held-out fifth of the training set.
Both encoders go through exactly the same code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from models.vit import VisionTransformer


@torch.no_grad()
def features(encoder: VisionTransformer, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    encoder.eval()
    out = []
    for i in range(0, len(images), batch):
        tokens = encoder.forward_features(images[i : i + batch])  # (B, 1 + L, D)
        out.append(torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1))  # (B, 2D)
    return torch.cat(out)


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
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    k = int(max(train_y.max(), test_y.max())) + 1
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    val, fit = order[: len(order) // 5], order[len(order) // 5 :]

    def acc(w, b, x, y) -> float:
        return float(((x @ w + b).argmax(1) == y).float().mean())

    best = max(
        (1e-4, 1e-3, 1e-2),
        key=lambda l2: acc(*_fit_logistic(train_x[fit], train_y[fit], k, l2), train_x[val], train_y[val]),
    )
    return acc(*_fit_logistic(train_x, train_y, k, best), test_x, test_y)


def random_like(encoder: VisionTransformer, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(**encoder.hparams()).eval()


def main(argv: list[str] | None = None) -> int:
    from pretrain.data import load_split
    from pretrain.export import from_hf

    p = argparse.ArgumentParser(prog="python -m pretrain.probe", description=__doc__.split("\n")[0])
    p.add_argument("hf_dir", help="folder written by python -m pretrain.export")
    p.add_argument("--dataset", default=None, help="default: the dataset the run trained on")
    p.add_argument("--train-samples", type=int, default=10000)
    p.add_argument("--test-samples", type=int, default=10000)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    hf_dir = Path(args.hf_dir)
    meta = json.loads((hf_dir / "tessera.json").read_text()) if (hf_dir / "tessera.json").is_file() else {}
    data = meta.get("data", {})  # the run's data section: the probe reads images the way training did
    dataset = args.dataset or data.get("dataset", "fashion_mnist")
    same = dataset == data.get("dataset")
    norm = {k: data.get(k) if same else None for k in ("mean", "std", "source")}
    model = from_hf(hf_dir)
    encoder = model.backbone if hasattr(model, "backbone") else model
    size = encoder.patch_embed.img_size
    t0 = time.time()
    train_x, train_y = load_split(dataset, "train", size, max_samples=args.train_samples, **norm)
    test_x, test_y = load_split(dataset, "test", size, max_samples=args.test_samples, **norm)
    results = {"dataset": dataset, "train_samples": len(train_y), "test_samples": len(test_y)}
    for name, enc in (("pretrained", encoder), ("random_init", random_like(encoder))):
        acc = logistic_accuracy(features(enc, train_x), train_y, features(enc, test_x), test_y)
        results[name] = acc
    print(
        f"linear probe on {dataset} ({len(train_y)} train / {len(test_y)} test images, "
        f"{time.time() - t0:.0f}s):"
    )
    print(f"  pretrained encoder  ({hf_dir}): accuracy {results['pretrained']:.4f}")
    print(f"  random-init encoder (same shape):  accuracy {results['random_init']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
