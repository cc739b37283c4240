"""Training-step throughput: Tessera's MAE vs transformers' ViTMAEForPreTraining holding the same weights.

One step = forward + loss + backward + AdamW step (fused AdamW, as Tessera's engines and HF Trainer build it),
with the same batch, images, mask noise and precision for every model. Models are timed alternately (round r:
Tessera, HF sdpa, HF eager; then again) after warmup steps; we report the median over rounds. HF is built from
Tessera's weights with `mae_to_hf`, and before timing we assert that all fp32 losses agree to 1e-4, so every
model does the same work. The headline ratio is Tessera / HF sdpa (transformers' default attention, its
strongest baseline here); eager is reported alongside. Results and analysis: docs/benchmarks.md.

    .venv/bin/python benchmarks/vit_mae_throughput.py --batch 8 --steps 2 --rounds 8 --warmup 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models import create_model  # noqa: E402
from models.vit_hf import mae_to_hf  # noqa: E402
from ops.compat import import_transformers  # noqa: E402
from pretrain.objectives.mae import MAE, MAEConfig  # noqa: E402
from pretrain.optim import param_groups  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16", help="Tessera registry name of the encoder")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU); default: torch's")
    p.add_argument(
        "--plain-adamw",
        action="store_true",
        help="torch's default (for-loop) AdamW for all, instead of AdamW(fused=True): Tessera's engines "
        "and HF Trainer on torch>=2.8 both use the fused one",
    )
    p.add_argument("--no-eager", action="store_true", help="skip transformers' eager-attention variant")
    return p.parse_args(argv)


class Runner:
    """A model plus its AdamW; `step(x, noise)` runs one full training step and returns the loss tensor."""

    def __init__(self, name: str, model: torch.nn.Module, forward, args: argparse.Namespace):
        self.name, self.model, self.forward, self.times = name, model.train(), forward, []
        fused = None if args.plain_adamw else True
        self.opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1.5e-4, betas=(0.9, 0.95), fused=fused)
        self.device, self.bf16 = args.device, args.precision == "bf16"

    def step(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.forward(x, noise)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(args: argparse.Namespace) -> list[Runner]:
    torch.manual_seed(0)
    vit = create_model(args.model, pos_embed="sincos")  # fixed sin-cos, as MAE (and HF's ViTMAE, frozen)
    cfg = MAEConfig(mask_ratio=0.75, norm_pix_loss=True, decoder_dim=512, decoder_depth=8, decoder_heads=16)
    mae = MAE(vit, cfg)
    # Built before any step, so both hold the same weights.
    hf = mae_to_hf(mae.backbone, mae.decoder, cfg.mask_ratio, cfg.norm_pix_loss)
    runners = [
        Runner("tessera", mae.to(args.device), lambda x, n: mae({"image": x}, noise=n)["loss"], args),
        Runner(
            f"hf_{hf.config._attn_implementation}",
            hf.to(args.device),
            lambda x, n: hf(pixel_values=x, noise=n).loss,
            args,
        ),
    ]
    if not args.no_eager:
        tf = import_transformers()
        eager = tf.ViTMAEForPreTraining._from_config(hf.config, attn_implementation="eager")  # decoder too
        eager.load_state_dict(hf.state_dict(), strict=True)
        eager_loss = lambda x, n: eager(pixel_values=x, noise=n).loss  # noqa: E731
        runners.append(Runner("hf_eager", eager.to(args.device), eager_loss, args))
    return runners


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tf = import_transformers()
    runners = build(args)
    vit = runners[0].model.backbone
    g = torch.Generator().manual_seed(1)
    n_batches = 4  # a few distinct batches, cycled; every model sees the same one at the same step index
    shape = (args.batch, vit.in_chans, vit.patch_embed.img_size, vit.patch_embed.img_size)
    batches = [  # (images (B, C, H, W), mask noise (B, L))
        (torch.randn(shape, generator=g), torch.rand(args.batch, vit.num_patches, generator=g))
        for _ in range(n_batches)
    ]
    batches = [(x.to(args.device), noise.to(args.device)) for x, noise in batches]

    # Same function? Losses before any update, in fp32 (bf16 rounding differs between graphs).
    x, noise = batches[0]
    with torch.no_grad():
        losses = {r.name: r.forward(x, noise).item() for r in runners}
    assert all(abs(v - losses["tessera"]) < 1e-4 for v in losses.values()), f"loss mismatch: {losses}"
    print(f"parity ok (fp32 loss, step 0): {losses}")

    for r in runners:  # warmup: allocator, oneDNN/cuBLAS plans, optimizer state
        for i in range(args.warmup):
            r.step(*batches[i % n_batches]).item()
    sync(args.device)

    for rnd in range(args.rounds):  # ABC ABC ...: drift (thermal, other load) hits every model alike
        for r in runners:
            sync(args.device)
            t0 = time.perf_counter()
            for i in range(args.steps):
                loss = r.step(*batches[(rnd * args.steps + i) % n_batches])
            loss.item()
            sync(args.device)
            r.times.append(time.perf_counter() - t0)
        print(
            f"round {rnd + 1}/{args.rounds}: "
            + "  ".join(f"{r.name} {args.batch * args.steps / r.times[-1]:.2f}/s" for r in runners),
            flush=True,
        )

    print(
        f"\ntorch {torch.__version__}, transformers {tf.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f" ({os.cpu_count()} cores)")
        + f", threads {torch.get_num_threads()}, precision {args.precision}"
        + f", load average {os.getloadavg()[0]:.2f} (1 min, at the end)"
    )
    print(
        f"{args.model} MAE (decoder 512x8x16, mask 0.75, norm_pix), batch {args.batch}, "
        f"{args.steps} steps x {args.rounds} rounds, warmup {args.warmup}, "
        f"AdamW {'torch default' if args.plain_adamw else 'fused'}"
    )
    rate = {r.name: args.batch * args.steps / statistics.median(r.times) for r in runners}
    for name, v in rate.items():
        print(f"  {name:<10} {v:8.2f} samples/s  ({1000 * args.batch / v:7.0f} ms/step, median)")
    for i, r in enumerate(runners[1:]):  # runners[1]: transformers' default attention (sdpa), the headline
        per_round = sorted(t / t0 for t, t0 in zip(r.times, runners[0].times))  # same round, adjacent in time
        tag = "  (headline)" if i == 0 else ""
        print(
            f"  ratio tessera / {r.name}: {rate['tessera'] / rate[r.name]:.3f}{tag}"
            f"   per round: median {statistics.median(per_round):.3f}, "
            f"range {per_round[0]:.3f}-{per_round[-1]:.3f}"
        )


if __name__ == "__main__":
    main()
