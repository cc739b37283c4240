"""ToMe merging and EViT pruning (models/token_reduce.py): ViT train-step throughput at several settings vs the
plain model, side by side in one process (steps alternate A B C ..., so load on the machine hits all alike).

    python benchmarks/token_reduce.py [--model vit_base_patch16] [--batch 8] [--steps 10] \
        [--tome 8 13 16] [--evit 0.7 0.5]

One train step = forward + cross-entropy on 10 classes + backward + AdamW, fp32, every model from the same initial
weights and the same random batch (throughput does not depend on the pixels). Prints img/s, the tokens left after
the last block and the speed-up over r = 0 / keep rate 1, then (unless --no-mask-check) what ToMe's proportional
attention costs inside attention: the model's SDPA forward + backward at its first block's shape, with and without
an additive (B, 1, 1, N) float bias (the log token sizes). What the switches cost in quality needs trainings
(benchmarks/token_reduce_quality.py): docs/benchmarks.md has both, with their commands.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import create_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_base_patch16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per setting (after 2 warm-up steps)")
    ap.add_argument("--tome", type=int, nargs="*", default=[8, 13, 16], help="tome_r values")
    ap.add_argument("--evit", type=float, nargs="*", default=[0.7, 0.5], help="evit_keep_rate values")
    ap.add_argument("--no-mask-check", action="store_true", help="skip the SDPA with / without bias timing")
    args = ap.parse_args(argv)
    settings = [("plain", {})]
    settings += [(f"tome_r={r}", dict(tome_r=r)) for r in args.tome]
    settings += [(f"evit_keep_rate={k:g}", dict(evit_keep_rate=k)) for k in args.evit]
    torch.manual_seed(0)
    ref = create_model(args.model, num_classes=10)
    h = ref.hparams()
    rows = side_by_side(ref, dict(settings), args.batch, args.steps)
    print(
        f"{args.model} at {h['img_size']} px, batch {args.batch}, fp32, {torch.get_num_threads()} threads, "
        f"{args.steps} timed steps per setting (median)"
    )
    print("| setting | tokens after the last block | img/s | speed-up |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['tokens_left']} | {r['img_per_s']:.1f} | {r['speedup']:.2f}x |")
    if not args.no_mask_check:
        mask_check(ref, args.batch, 3 * args.steps)
    return 0


def side_by_side(ref: torch.nn.Module, settings: dict[str, dict], batch: int, steps: int) -> dict[str, dict]:
    """{name: {"img_per_s", "tokens_left", "speedup"}}: train steps (forward, 10-way cross-entropy, backward, AdamW)
    of ref's architecture with each setting's switches (the first setting is the baseline), all from ref's weights
    and one random batch, taking their steps in turn (2 warm-up steps, then the median of `steps`)."""
    runs = {}
    for name, kw in settings.items():
        model = type(ref)(**{**ref.hparams(), **kw})
        model.load_state_dict(ref.state_dict())
        runs[name] = (model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4))
    h = ref.hparams()
    x = torch.randn(batch, h["in_chans"], h["img_size"], h["img_size"])
    y = torch.randint(0, 10, (batch,))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(steps + 2):
        for name, (model, opt) in runs.items():
            t0 = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(next(iter(times.values())))
    out = {}
    for name, (model, _) in runs.items():
        with torch.no_grad():
            left = model.forward_features(x[:1]).shape[1]
        med = statistics.median(times[name])
        out[name] = {"img_per_s": batch / med, "tokens_left": left, "speedup": base / med}
    return out


def mask_check(model, batch: int, steps: int) -> dict[str, float]:
    """Median seconds of SDPA forward + backward at the model's attention shape without and with ToMe's additive
    key bias (B, 1, 1, N); prints both and their ratio."""
    from ops.attention import attention

    h = model.hparams()
    heads, dim = h["num_heads"], h["embed_dim"]
    n = model.num_prefix_tokens + (h["img_size"] // h["patch_size"]) ** 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, dim // heads, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.rand(batch, 1, 1, n, generator=g).log1p()  # log sizes >= 0
    times: dict[str, list[float]] = {"no bias": [], "bias": []}
    for i in range(steps + 2):
        for name, m in (("no bias", None), ("bias", bias)):
            t0 = time.perf_counter()
            attention(q, k, v, attn_mask=m).sum().backward()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"SDPA fwd+bwd at ({batch}, {heads}, {n}, {dim // heads}): no bias {1e3 * med['no bias']:.1f} ms, "
        f"with ToMe's float key bias {1e3 * med['bias']:.1f} ms ({med['bias'] / med['no bias']:.2f}x)"
    )
    return med


if __name__ == "__main__":
    sys.exit(main())
