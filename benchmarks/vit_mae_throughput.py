"""Training-step throughput: Tessera's MAE vs transformers' ViTMAEForPreTraining holding the same weights.

One step = forward + loss + backward + AdamW step (fused AdamW, as Tessera's engines and HF Trainer build it),
with the same batch, images, mask noise and precision for every model. Models are timed alternately (round r:
Tessera, HF sdpa, HF eager; then again) after warmup steps; we report the median over rounds. HF is built from
Tessera's weights with `mae_to_hf`, and before timing we assert that all fp32 losses agree to 1e-4, so every
model does the same work. The headline ratio is Tessera / HF sdpa (transformers' default attention, its
strongest baseline here); eager is reported alongside. MFU: model FLOPs per sample counted once on the meta device
(pretrain.mfu.count_train_flops; the same for every model, which do the same work) over the device's peak
(pretrain.mfu.device_peak_tflops: the GPU's bf16 data-sheet peak, or a measured CPU matmul rate). Results and
analysis: docs/benchmarks.md; `run(args)` returns the numbers (benchmarks/gpu_check.py calls it).

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
from pretrain.mfu import count_train_flops, device_peak_tflops  # noqa: E402
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
    p.add_argument("--decoder", default="512x8x16", help="MAE decoder DIMxDEPTHxHEADS (MAE paper: 512x8x16)")
    return p.parse_args(argv)


def mae_config(args: argparse.Namespace) -> MAEConfig:
    dim, depth, heads = (int(v) for v in args.decoder.split("x"))
    return MAEConfig(
        mask_ratio=0.75, norm_pix_loss=True, decoder_dim=dim, decoder_depth=depth, decoder_heads=heads
    )


def flops_per_sample(args: argparse.Namespace) -> float:
    """Model FLOPs of one train step (forward + backward) per sample, counted on the meta device."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        mae = MAE(create_model(args.model, pos_embed="sincos"), mae_config(args)).to("meta")
        vit = mae.backbone
        size = vit.patch_embed.img_size
        x = torch.empty(args.batch, vit.in_chans, size, size)
        return count_train_flops(mae, {"image": x}) / args.batch


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
    cfg = mae_config(args)
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


def run(args: argparse.Namespace) -> dict:
    """Build, check parity, time; returns {"rate": {name: samples/s}, "times": {name: [s per round]}, ...}."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tf = import_transformers()
    flops = flops_per_sample(args)
    try:
        peak, peak_source = device_peak_tflops(torch.device(args.device), args.precision)
    except LookupError as err:  # a GPU missing from pretrain.mfu.GPU_PEAK_TFLOPS: no MFU
        peak, peak_source = None, str(err)
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

    # Same function? Losses before any update, in fp32 (bf16 rounding differs between graphs; TF32 off on CUDA,
    # where cuDNN convolutions would otherwise use it).
    x, noise = batches[0]
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
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
    rate = {r.name: args.batch * args.steps / statistics.median(r.times) for r in runners}
    return {
        "transformers": tf.__version__,
        "losses": losses,
        "rate": rate,
        "times": {r.name: r.times for r in runners},
        "flops_per_sample": flops,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "mfu": {k: None if peak is None else v * flops / (peak * 1e12) for k, v in rate.items()},
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    res = run(args)
    print(
        f"\ntorch {torch.__version__}, transformers {res['transformers']}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f" ({os.cpu_count()} cores)")
        + f", threads {torch.get_num_threads()}, precision {args.precision}"
        + f", load average {os.getloadavg()[0]:.2f} (1 min, at the end)"
    )
    print(
        f"{args.model} MAE (decoder {args.decoder}, mask 0.75, norm_pix), batch {args.batch}, "
        f"{args.steps} steps x {args.rounds} rounds, warmup {args.warmup}, "
        f"AdamW {'torch default' if args.plain_adamw else 'fused'}"
    )
    peak = res["peak_tflops"]
    print(
        f"model FLOPs per sample (train step) {res['flops_per_sample'] / 1e9:.2f} G; peak "
        + ("unknown" if peak is None else f"{peak:.3g} TFLOP/s")
        + f" ({res['peak_source']})"
    )
    rate, times = res["rate"], res["times"]
    for name, v in rate.items():
        mfu = res["mfu"][name]
        print(
            f"  {name:<10} {v:8.2f} samples/s  ({1000 * args.batch / v:7.0f} ms/step, median)"
            + ("" if mfu is None else f"  MFU {100 * mfu:.1f}%")
        )
    names = list(rate)
    for i, name in enumerate(names[1:]):  # names[1]: transformers' default attention (sdpa), the headline
        per_round = sorted(t / t0 for t, t0 in zip(times[name], times["tessera"]))  # same round, adjacent
        tag = "  (headline)" if i == 0 else ""
        print(
            f"  ratio tessera / {name}: {rate['tessera'] / rate[name]:.3f}{tag}"
            f"   per round: median {statistics.median(per_round):.3f}, "
            f"range {per_round[0]:.3f}-{per_round[-1]:.3f}"
        )


if __name__ == "__main__":
    main()
