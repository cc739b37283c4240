"""Model FLOPs utilization: how much of the hardware's matmul peak the model's own arithmetic uses.

    MFU = (model FLOPs per sample x samples/s) / (peak FLOP/s per device x devices)

* FLOPs per sample are counted once at start by torch's FLOP counter on the run's real model and objective, one
  train step (forward + backward), built on the meta device (no memory, no arithmetic). Only what the model needs
  counts: activation-checkpointing recompute is left out (the copy is built without it), as are elementwise
  ops and norms (the counter counts matmuls, convolutions and attention).
* Peak FLOP/s: on a GPU the bf16 dense tensor-core peak from a table of known cards (`GPU_PEAK_TFLOPS`); on a CPU
  a matmul rate measured at start in the run's precision (a few hundred ms, all ranks at once, so ranks sharing
  cores measure their share). `run.peak_tflops` overrides either (per device).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_flop_count

log = logging.getLogger("tessera")

# bf16 dense (no sparsity) tensor-core peak per device, TFLOP/s, from the vendors' data sheets, matched against
# torch.cuda.get_device_name() in this order (the first substring found wins, so specific names come first).
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.5),
    ("H200 NVL", 835.5),
    ("H200", 989.5),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.5),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.5),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("RTX 6000 Ada", 364.2),
    ("RTX A6000", 154.8),
    ("L4", 121.0),
    ("MI300X", 1307.4),
)

aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)  # dQ, dK, dV, dP: twice the forward


def _conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _out_pad,
    _groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    """Each of a convolution's two gradients (input, weight) costs what its forward costs. (torch's own formula
    ignores `groups` for the weight gradient, counting a depthwise conv's C-fold: ConvNeXt's dwconv 7x7.)"""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)  # w_shape holds C_in / groups
    return forward * (int(output_mask[0]) + int(output_mask[1]))


# The CPU flash kernel, which torch's counter does not know, for a count taken on a CPU device. Its backward counts
# the model's four matmuls, not the kernel's recomputed scores (torch's formula for the CUDA kernels counts five):
# MFU counts the model's FLOPs, as the meta device's decomposed attention does.
_EXTRA_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flop,
    aten.convolution_backward: _conv_backward_flop,
}


def count_train_flops(module: torch.nn.Module, batch: dict) -> int:
    """FLOPs of one forward + backward of `module(batch)["loss"]` (any device, meta included)."""
    return count_flops(lambda: module(batch)["loss"].backward())


def count_flops(thunk) -> int:
    """FLOPs of whatever `thunk()` runs (a train step of any model), counted as `count_train_flops` counts."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        thunk()
    return counter.get_total_flops()


def train_flops_per_sample(cfg, batch_size: int = 2) -> float:
    """Model FLOPs of one train step per sample for the run's model + objective (see the module docstring)."""
    from pretrain.build import build_model, example_batch

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, grad_checkpointing=False))
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # build_model seeds the global RNG
        module = build_model(cfg).to("meta").train()  # (buffers made from numpy arrays start on the CPU)
        flops = count_train_flops(module, example_batch(cfg, batch_size, torch.device("meta")))
    return flops / batch_size


def gpu_peak_tflops(name: str) -> float | None:
    """bf16 dense peak of the GPU called `name` (torch.cuda.get_device_name), or None if not in the table."""
    for key, tflops in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def measure_matmul_tflops(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seconds: float = 0.3,
    n: int = 1024,
) -> float:
    """Achieved TFLOP/s of square (n x n) matmuls for about `seconds`, on this process's threads."""
    g = torch.Generator().manual_seed(0)  # not the global RNG: the run's draws stay as they were
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    torch.mm(a, b)  # warm up (thread pool, packing buffers)
    count, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        count += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    return 2 * n**3 * count / elapsed / 1e12


def device_peak_tflops(
    device: torch.device, precision: str, override: float | None = None
) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where the number comes from)."""
    if override is not None:
        return override, "run.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = gpu_peak_tflops(name)
        if tflops is None:
            raise LookupError(f"{name!r} is not in pretrain.mfu.GPU_PEAK_TFLOPS: set run.peak_tflops")
        return tflops, f"{name}, bf16 dense data-sheet peak"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tflops = measure_matmul_tflops(dtype, device)
    return (
        tflops,
        f"measured {str(dtype).split('.')[-1]} matmul rate on {torch.get_num_threads()} CPU thread(s)",
    )


# --- text models: the formula everyone reports ------------------------------------------------------------


@dataclasses.dataclass
class TextFlops:
    """Train FLOPs per token of a text model: `dense` + Σ over softmax layers of `attn[i]` x (keys seen).

    dense = 6·N_matmul (every weight matrix once forward, twice backward; the LM head counts, tied or not, the
    embedding lookup does not) + the chunked linear-attention layers' own work; attn[i] = 12·H·hd per softmax
    layer (q·k and p·v, forward and backward, no causal discount): with keys seen = the row length s this is
    torchtitan's and llm-foundry's `6N + 12·L·d·s`; for packed rows each token sees its document (Σ sᵢ² / N on
    average), never more than the layer's window.
    """

    dense: float
    attn: list[float]
    windows: list[int | None]

    def per_token(self, keys_seen: float) -> float:
        return self.dense + sum(
            c * (keys_seen if w is None else min(keys_seen, w)) for c, w in zip(self.attn, self.windows)
        )


def text_flops(backbone: torch.nn.Module, seq_len: int) -> TextFlops:
    """TextFlops of a text backbone (models/text_layers.py contract: attention_layout())."""
    from ops.linear_attention import linear_attention_flops

    def shape(p: torch.nn.Parameter) -> tuple[int, ...]:
        return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape in ds_shape

    emb = next(m for m in backbone.modules() if isinstance(m, torch.nn.Embedding)).weight  # (V, D)
    weights = [p for p in backbone.parameters() if len(shape(p)) >= 2 and p is not emb]
    matmul = sum(math.prod(shape(p)) for p in weights)
    if shape(emb) not in {shape(p) for p in weights}:  # a tied head: its matmul is the embedding matrix's
        matmul += math.prod(shape(emb))
    dense, attn, windows = 6.0 * matmul, [], []
    for layer in backbone.attention_layout():
        if layer["kind"] == "linear":
            fwd = linear_attention_flops(1, layer["heads"], seq_len, layer["dk"], layer["dv"], 64)
            dense += 3.0 * fwd / seq_len
        else:
            attn.append(12.0 * layer["heads"] * layer["head_dim"])
            windows.append(layer["window"])
    return TextFlops(dense, attn, windows)


def packed_stats(batch: dict) -> tuple[int, int]:
    """(real tokens, Σ over the documents of every row of len²) of a packed text batch (doc_ids (B, N), -1 = pad)."""
    doc_ids = batch["doc_ids"]
    real = doc_ids >= 0
    offset = (
        doc_ids.clamp(min=0)
        + (torch.arange(doc_ids.shape[0], device=doc_ids.device) * doc_ids.shape[1])[:, None]
    )
    counts = torch.bincount(offset[real].flatten(), minlength=1)
    return int(real.sum()), int(counts.square().sum())


@dataclasses.dataclass
class Throughput:
    """Per-step throughput figures for the metrics, from counts made once at start."""

    flops_per_sample: float | None  # None when the model could not be counted (no MFU then)
    tokens_per_sample: int  # patches for images (at the stem's stride), tokens for text
    peak_flops: float | None  # all devices together, FLOP/s
    text: TextFlops | None = None  # text models: the per-document variant is computed from every step's rows

    def step_metrics(
        self, samples: int, seconds: float, packed: tuple[int, int] | None = None
    ) -> dict[str, float]:
        """`packed`: (real tokens, Σ doc len²) of the step's rows, all ranks together (text only)."""
        out = {"tokens_per_sec": samples * self.tokens_per_sample / seconds}
        if self.flops_per_sample is not None:
            achieved = samples * self.flops_per_sample / seconds
            out["tflops"] = achieved / 1e12
            if self.peak_flops:
                out["mfu"] = achieved / self.peak_flops
        if self.text is not None and packed is not None and packed[0]:
            real, sum_sq = packed
            out["real_tokens_per_sec"] = real / seconds
            # each real token sees its own document: Σ sᵢ² / Σ sᵢ keys on average
            doc_flops = real * self.text.per_token(sum_sq / real) / seconds
            out["tflops_doc"] = doc_flops / 1e12
            if self.peak_flops:
                out["mfu_doc"] = doc_flops / self.peak_flops
        return out


def tokens_per_sample(backbone: torch.nn.Module, image_size: int, text_len: int = 0) -> int:
    """Patches a backbone cuts one image into: (size / stride)^2, the stride being its patch or stem stride. A
    two-tower model (`visual` + `text`): its image tower's patches plus the caption's `text_len` tokens."""
    if getattr(backbone, "modality", "image") == "image_text":
        return tokens_per_sample(backbone.visual, image_size) + text_len
    stride = getattr(backbone, "patch_size", None) or getattr(backbone, "stem_stride", None) or 1
    return (image_size // stride) ** 2


def build_throughput(cfg, ctx, module: torch.nn.Module) -> Throughput:
    """Count FLOPs, find the peak (every rank measures at once, then the peaks are summed), log both."""
    backbone = getattr(module, "backbone", module)
    text = None
    if getattr(backbone, "modality", "image") == "text":
        tokens = cfg.data.seq_len
        text = text_flops(backbone, tokens)
        flops = tokens * text.per_token(tokens)  # 6N + 12·L·d·s per token, s = the row
    else:
        tokens = tokens_per_sample(backbone, cfg.data.image_size, cfg.data.text_len)
        try:
            flops = train_flops_per_sample(cfg)
        except Exception as err:  # a model the meta device cannot run: throughput still logs, MFU does not
            log.warning("could not count the model's FLOPs on the meta device (%s): no MFU for this run", err)
            flops = None
    ctx.barrier()  # measure the CPU rate on all ranks at once: they share the cores while training too
    try:
        peak, source = device_peak_tflops(ctx.device, cfg.engine.precision, cfg.run.peak_tflops)
    except LookupError as err:
        log.warning("no MFU: %s", err)
        peak, source = None, "unknown"
    # every rank joins the sum (a rank without a peak too: a collective some ranks skip would hang the others)
    summed, unknown = ctx.all_reduce_sum([0.0 if peak is None else peak * 1e12, float(peak is None)])
    total_peak = None if unknown else summed
    log.info(
        "MFU accounting: %s model FLOPs per sample (forward + backward), %d tokens per sample; peak %s per "
        "device (%s), %s in all",
        "?" if flops is None else _si(flops, ""),
        tokens,
        "?" if peak is None else _si(peak * 1e12, "/s"),
        source,
        "?" if total_peak is None else _si(total_peak, "/s"),
    )
    return Throughput(flops, tokens, total_peak, text)


def _si(flops: float, suffix: str) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3f} {unit}FLOP{suffix}"
    return f"{flops:.0f} FLOP{suffix}"
