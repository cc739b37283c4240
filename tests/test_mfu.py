"""MFU accounting: FLOP counts against hand-computed numbers, the meta-device count against a real one for every
registered model, the device peaks, and the metrics a training run logs."""

import dataclasses
import json

import pytest
import torch

from models import MODELS, list_models
from pretrain import mfu
from pretrain.build import build_model, example_batch, load_config
from pretrain.train import main
from tests.conftest import ROOT

CLASSIFY = str(ROOT / "configs" / "classify_tiny.yaml")


def linear(n: int, d_in: int, d_out: int) -> int:
    """Forward FLOPs of a linear layer on n rows (a multiply-add is 2 FLOPs; bias adds are not counted)."""
    return 2 * n * d_in * d_out


def vit_train_flops(img: int, patch: int, chans: int, dim: int, depth: int, mlp: int, classes: int) -> int:
    """A ViT classification step by hand. Backward costs twice the forward for every matmul (input and weight
    gradients), except the patch embedding, whose input (the image) needs no gradient: once."""
    n = (img // patch) ** 2 + 1  # tokens, cls included
    patch_embed = linear((img // patch) ** 2, chans * patch * patch, dim)  # a conv with stride = kernel
    block = (
        linear(n, dim, 3 * dim)  # qkv
        + 2 * (2 * n * n * dim)  # q k^T and attn v, all heads together
        + linear(n, dim, dim)  # proj
        + linear(n, dim, mlp * dim)
        + linear(n, mlp * dim, dim)
    )
    head = linear(1, dim, classes)
    return 2 * patch_embed + 3 * (depth * block + head)


def convnext_train_flops(img: int, chans: int, depths, dims, classes: int) -> int:
    """A ConvNeXt classification step by hand: stem 4x4/4 conv, per stage a 2x2/2 downsample conv (not in stage
    0) and blocks of depthwise 7x7 conv + two pointwise linears (x4 expansion), then the linear head. Backward
    twice the forward, except the stem (no input gradient): once."""
    side = img // 4
    stem = 2 * side * side * dims[0] * chans * 16
    total = 0
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        if i:
            side //= 2
            total += 2 * side * side * dim * dims[i - 1] * 4  # 2x2 conv, stride 2
        hw = side * side
        block = (
            2 * hw * dim * 49 + linear(hw, dim, 4 * dim) + linear(hw, 4 * dim, dim)
        )  # depthwise: C_in/groups = 1
        total += depth * block
    total += linear(1, dims[-1], classes)
    return 2 * stem + 3 * total


def test_vit_flops_match_hand_count():
    cfg = load_config(CLASSIFY, ["model.name=vit_test_patch4"])
    h = build_model(cfg).backbone.hparams()
    want = vit_train_flops(
        h["img_size"], h["patch_size"], h["in_chans"], h["embed_dim"], h["depth"], int(h["mlp_ratio"]), 10
    )
    assert mfu.train_flops_per_sample(cfg) == want


def test_convnext_flops_match_hand_count():
    """A hierarchical family with depthwise convolutions (torch's own counter gets their weight gradient wrong)."""
    cfg = load_config(CLASSIFY, ["model.name=convnext_test"])
    h = build_model(cfg).backbone.hparams()
    want = convnext_train_flops(h["img_size"], h["in_chans"], h["depths"], h["dims"], 10)
    assert mfu.train_flops_per_sample(cfg) == want


def test_mae_counts_the_visible_tokens_only():
    """MAE's encoder sees 1 + (1 - mask_ratio) of the patches: masking more costs fewer FLOPs."""
    tiny = str(ROOT / "configs" / "mae_tiny.yaml")
    counts = [
        mfu.train_flops_per_sample(load_config(tiny, [f"objective.mask_ratio={r}"])) for r in (0.25, 0.75)
    ]
    assert counts[0] > counts[1] > 0


IMAGE_TEST_MODELS = [
    n for n in list_models("*_test*") if getattr(MODELS.get(n).builds, "modality", "image") == "image"
]


@pytest.mark.parametrize("name", IMAGE_TEST_MODELS)
def test_meta_count_equals_a_real_count(name):
    """Every registered model: the count on the meta device (what runs use) equals one on real CPU tensors,
    and activation checkpointing (recompute) does not change it."""
    cfg = load_config(
        CLASSIFY, [f"model.name={name}", f"data.image_size={MODELS.get(name).smoke.get('img_size', 32)}"]
    )
    meta = mfu.train_flops_per_sample(cfg)
    model = build_model(cfg).train()
    real = mfu.count_train_flops(model, example_batch(cfg, 2)) / 2
    assert meta == real > 0
    cfg.model.grad_checkpointing = True
    assert mfu.train_flops_per_sample(cfg) == meta


def test_cpu_attention_kernel_counts_like_the_model():
    """The CPU flash kernel: forward 4·N²·d, backward twice that (no recomputed scores)."""
    q = torch.randn(2, 3, 17, 8, requires_grad=True)
    with mfu.FlopCounterMode(display=False, custom_mapping=mfu._EXTRA_FORMULAS) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    assert counter.get_total_flops() == 3 * (2 * 3 * 2 * (2 * 17 * 17 * 8))


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.5),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.5),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.1),
        ("Tesla T4", None),
    ],
)
def test_gpu_peaks_by_name(name, tflops):
    assert mfu.gpu_peak_tflops(name) == tflops


def test_peaks_and_step_metrics():
    assert mfu.device_peak_tflops(torch.device("cpu"), "fp32", override=2.5) == (2.5, "run.peak_tflops")
    measured, source = mfu.device_peak_tflops(torch.device("cpu"), "fp32")
    assert measured > 0 and "measured float32" in source
    t = mfu.Throughput(flops_per_sample=1e9, tokens_per_sample=49, peak_flops=1e12)
    m = t.step_metrics(samples=100, seconds=0.5)
    assert m == pytest.approx({"tokens_per_sec": 9800.0, "tflops": 0.2, "mfu": 0.2})
    assert mfu.Throughput(None, 49, 1e12).step_metrics(10, 1.0) == {"tokens_per_sec": 490.0}


def test_a_run_logs_throughput_and_mfu(tmp_path, digits_shards, capsys):
    """metrics.jsonl carries tokens/s, achieved TFLOP/s and MFU, consistent with samples/s and the counts; the
    progress bar shows MFU."""
    run = tmp_path / "run"
    args = [
        CLASSIFY,
        *("--set", f"run.output_dir={run}", "--set", f"data.local={digits_shards}"),
        *("--set", "run.progress=true", "--set", "train.max_steps=3", "--set", "run.peak_tflops=0.5"),
    ]
    assert main(args) == 0
    assert "mfu=" in capsys.readouterr().err  # the bar's last state, printed when it closes
    cfg = load_config(CLASSIFY, ["run.peak_tflops=0.5"])
    flops = mfu.train_flops_per_sample(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["tflops"] == pytest.approx(row["samples_per_sec"] * flops / 1e12)
        assert row["mfu"] == pytest.approx(row["tflops"] / 0.5)
        assert row["tokens_per_sec"] == pytest.approx(row["samples_per_sec"] * (32 // 4) ** 2)
    (tb,) = (run / "tensorboard").glob("events.*")
    assert b"mfu" in tb.read_bytes()


def test_an_unknown_peak_means_no_mfu_but_throughput(monkeypatch):
    from pretrain.dist import DistContext

    def unknown(*args, **kwargs):
        raise LookupError("'Some GPU' is not in pretrain.mfu.GPU_PEAK_TFLOPS: set run.peak_tflops")

    monkeypatch.setattr(mfu, "device_peak_tflops", unknown)
    cfg = load_config(CLASSIFY)
    t = mfu.build_throughput(cfg, DistContext(), build_model(cfg))
    assert t.peak_flops is None and t.flops_per_sample == mfu.train_flops_per_sample(cfg)
    assert set(t.step_metrics(16, 1.0)) == {"tokens_per_sec", "tflops"}


# --- text: 6N + 12·L·d·s, and its per-document variant ------------------------------------------------------


def text_batch(lengths, vocab=512):
    ids = torch.randint(5, vocab, (1, sum(lengths)))
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids, "doc_ids": doc, "positions": pos}


def test_text_formula_by_hand():
    """llama_test (dim 64, 2 layers, 4 heads of 16, 2 kv heads, SwiGLU 256, untied head of 512 ids): 6N + 12·L·d·s."""
    model = build_model(load_config(str(ROOT / "configs" / "clm_tiny.yaml"))).backbone
    d, L, kv, ffn, V = 64, 2, 2 * 16, 256, 512
    n_matmul = L * (d * d + 2 * d * kv + d * d + 3 * d * ffn) + d * V  # q, k, v, o, SwiGLU; the head
    flops = mfu.text_flops(model, 128)
    assert flops.dense == 6 * n_matmul
    assert flops.per_token(128) == 6 * n_matmul + 12 * L * d * 128
    assert flops.per_token(1e9) == flops.per_token(1e9)  # no window: keys seen grow without bound


@pytest.mark.parametrize("config", ["clm_tiny.yaml", "mlm_tiny.yaml"])
def test_text_formula_equals_the_counted_matmuls(config):
    """On one document per row, the formula is exactly what torch's counter counts for a train step (causal
    attention counted in full, as in the formula); a packed row costs what its documents cost alone, which for
    layers without a window is the per-document variant: keys seen = Σ sᵢ² / Σ sᵢ."""
    cfg = load_config(str(ROOT / "configs" / config))
    model = build_model(cfg).train()
    backbone = model.backbone
    torch.manual_seed(0)
    s = 96  # longer than modernbert_test's local window (16): local layers count their window
    flops = mfu.text_flops(backbone, s)
    # the CPU kernels compute a local layer's window as a masked full row: the counter sees s keys there, the
    # formula (model FLOPs, what a windowed kernel does) min(s, window)
    full = dataclasses.replace(flops, windows=[None] * len(flops.windows))
    windows = [layer["window"] for layer in backbone.attention_layout() if layer["kind"] == "softmax"]
    assert flops.windows == windows
    assert flops.per_token(s) == full.dense + sum(c * min(s, w or s) for c, w in zip(flops.attn, windows))
    assert mfu.count_train_flops(model, text_batch([s])) == s * full.per_token(s)
    lengths = [40, 30, 26]
    real, sum_sq = mfu.packed_stats(text_batch(lengths))
    assert (real, sum_sq) == (96, sum(n * n for n in lengths))
    by_doc = sum(n * full.per_token(n) for n in lengths)  # each document costs what it costs alone
    assert by_doc == real * full.per_token(sum_sq / real)
    # the model's FLOPs of a packed row: its documents' (the kernels may do more: padding, or a masked full row)
    assert sum(mfu.count_train_flops(model, text_batch([n])) for n in lengths) == by_doc
