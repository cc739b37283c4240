"""Two-tower exports (models/two_tower_hf.py, pretrain/export.py): CLIPModel, SiglipModel and
VisionTextDualEncoderModel hold Tessera's two-tower models exactly (normalized image and text embeddings and
logits to 1e-5 in fp32, on random images and padded captions), load with no missing or unexpected keys through
AutoModel and their own class, and come back through from_hf with identical outputs; folders transformers wrote
from its own random init import too; towers no transformers class holds raise an error naming them; and with the
run's data config the folder gets the processor (AutoProcessor, offline) whose tokenizer gives the ids of
Tessera's data layer and whose image processor repeats its eval transform.

The zero-shot pipeline on a trained CLIP export runs in tests/test_export_pipelines.py; transformers 5 loads the
three targets in tests/test_transformers5.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models import MODELS, create_model
from models.two_tower_hf import hf_embeddings, hf_target, tessera_embeddings
from ops.compat import import_transformers
from pretrain import export
from pretrain.data.config import DataConfig
from tests.conftest import ROOT, trained_like

pytestmark = pytest.mark.usefixtures("hf_offline")
tf = import_transformers()
ATOL = 1e-5
DUAL = "VisionTextDualEncoderModel"
CLIP_VIT = dict(MODELS.get("clip_test").smoke["image_kwargs"])  # pre_norm, no patch bias, eps 1e-5, 2 blocks
SIGLIP_VIT = dict(MODELS.get("siglip_test").smoke["image_kwargs"])  # no cls token, MAP head, 2 blocks


def two_tower(name: str = "clip_test", image_tower: str | None = None, **kw) -> torch.nn.Module:
    """A two-tower model at its smoke size (another image tower at that tower's smoke size), weights perturbed."""
    args = dict(MODELS.get(name).smoke)
    if image_tower is not None:
        tower = dict(MODELS.get(image_tower).smoke)
        args.update(image_tower=image_tower, img_size=tower.pop("img_size", 32), image_kwargs=tower)
    torch.manual_seed(0)
    return trained_like(create_model(name, **{**args, **kw}))


def captions(model, lengths=(16, 7, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids as the loader gives them: a row of `n` real tokens ends with EOS (CLIP) and is padded
    with the padding id; (input_ids (B, L), attention_mask (B, L))."""
    L, eos = model.context_length, model.eos_token_id
    pad = model.pad_token_id if model.pad_token_id is not None else (eos if eos is not None else 0)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.vocab_size, (len(lengths), L), generator=g)
    if eos is not None:
        ids[ids == eos] = (eos + 1) % model.vocab_size  # EOS only where a caption ends
    mask = torch.zeros(len(lengths), L, dtype=torch.int64)
    for i, n in enumerate(lengths):
        if eos is not None:
            ids[i, n - 1] = eos
        ids[i, n:] = pad
        mask[i, :n] = 1
    return ids, mask


# id: (two_tower kwargs, the target it exports to)
CASES = {
    "clip": (dict(), "CLIPModel"),
    "clip-patch-bias-quick-gelu": (  # the patch bias folds into the position table; another activation
        dict(image_kwargs={**CLIP_VIT, "patch_bias": True, "act": "quick_gelu", "qkv_bias": False}),
        "CLIPModel",
    ),
    "clip-image-proj-none": (dict(image_proj="none"), "CLIPModel"),
    "siglip": (dict(name="siglip_test"), "SiglipModel"),
    "siglip-tanh-no-bias": (  # GELU (tanh) in both towers; trained without a logit bias: SiglipModel's is 0
        dict(
            name="siglip_test",
            image_kwargs={**SIGLIP_VIT, "act": "gelu_tanh"},
            text_kwargs={"depth": 2, "act": "gelu_tanh"},
            init_logit_bias=None,
        ),
        "SiglipModel",
    ),
    "dual-vit": (dict(image_tower="vit_test_patch4"), DUAL),
    "dual-vit-head-mask-token": (  # neither reaches the pooled features: ViTModel holds the tower without them
        dict(
            image_tower="vit_test_patch4",
            image_kwargs=dict(patch_size=8, depth=2, num_classes=5, mask_token=True),
        ),
        DUAL,
    ),
    "dual-swin": (dict(image_tower="swin_test"), DUAL),
    "dual-swinv2": (dict(image_tower="swinv2_test"), DUAL),
    "dual-convnext": (dict(image_tower="convnext_test"), DUAL),
    "dual-convnextv2": (dict(image_tower="convnextv2_test"), DUAL),
}


def hf_outputs(hf, target: str, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """The HF model's normalized embeddings and logits_per_image, from its forward (CLIP, SigLIP: SigLIP without an
    attention mask, as its processor gives none) or, for the dual encoder, its towers and projections
    (4.57's forward cannot run a CLIPTextModel: test_dual_encoder_forward_needs_transformers5)."""
    if target == DUAL:
        return hf_embeddings(hf, x, ids, mask)
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=x, attention_mask=None if target == "SiglipModel" else mask)
    return {k: getattr(out, k) for k in ("image_embeds", "text_embeds", "logits_per_image")}


@pytest.mark.parametrize("case", list(CASES))
def test_export_holds_the_model_exactly_and_comes_back(case, tmp_path):
    kwargs, target = CASES[case]
    model = two_tower(**kwargs)
    assert hf_target(model) == target
    export.to_hf(model, tmp_path)
    x = torch.randn(
        2, model.in_chans, model.img_size, model.img_size, generator=torch.Generator().manual_seed(3)
    )
    ids, mask = captions(model)
    ours = tessera_embeddings(model, x, ids, mask)
    assert ours["logits_per_image"].std() > 0.05  # not a degenerate comparison
    for cls in ("AutoModel", target):
        hf, info = getattr(tf, cls).from_pretrained(tmp_path, output_loading_info=True)
        assert type(hf).__name__ == target and not any(info.values()), info
        theirs = hf_outputs(hf.eval(), target, x, ids, mask)
        for key, want in ours.items():
            torch.testing.assert_close(theirs[key], want, atol=ATOL, rtol=0, msg=f"{cls} {key}")
    back = export.from_hf(tmp_path)
    assert type(back.visual) is type(model.visual) and back.text.causal == model.text.causal
    again = tessera_embeddings(back, x, ids, mask)
    # identical; but a patch bias CLIPModel folded into the position table is added in another order (fp32 ulps)
    folded = target == "CLIPModel" and model.visual.patch_bias
    for key, want in ours.items():
        torch.testing.assert_close(
            again[key], want, atol=1e-6 if folded else 0, rtol=0, msg=f"round trip {key}"
        )


def test_siglip_runs_its_text_tower_on_the_padding(tmp_path):
    """Why SigLIP's processor returns no attention_mask: with one, SiglipModel's text embeddings are not the
    ones Tessera trained (its bidirectional tower attends to the padding)."""
    model = two_tower("siglip_test")
    export.to_hf(model, tmp_path)
    hf = tf.SiglipModel.from_pretrained(tmp_path).eval()
    ids, mask = captions(model)
    want = tessera_embeddings(model, torch.zeros(1, 3, 32, 32), ids)["text_embeds"]
    with torch.no_grad():
        masked = hf.get_text_features(input_ids=ids, attention_mask=mask)
    masked = masked / masked.norm(dim=-1, keepdim=True)
    assert (masked - want)[1:].abs().max() > 1e-3  # the padded rows differ; the full row is the same
    torch.testing.assert_close(masked[0], want[0], atol=ATOL, rtol=0)


def test_dual_encoder_forward_needs_transformers5(tmp_path):
    """transformers 4.57's dual encoder passes token_type_ids to CLIPTextModel, which rejects it: the model card
    says so and shows the tower calls (tests/test_transformers5.py runs the forward under transformers 5)."""
    model = two_tower(image_tower="vit_test_patch4")
    export.to_hf(model, tmp_path)
    hf = tf.VisionTextDualEncoderModel.from_pretrained(tmp_path).eval()
    ids, mask = captions(model)
    if int(tf.__version__.split(".")[0]) < 5:
        with pytest.raises(TypeError, match="token_type_ids"):
            hf(input_ids=ids, pixel_values=torch.zeros(1, 3, 32, 32), attention_mask=mask)
    torch.testing.assert_close(hf.logit_scale.reshape(1), model.logit_scale.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["CLIPModel", "SiglipModel"])
def test_imports_a_folder_transformers_wrote(arch, tmp_path):
    """A CLIPModel / SiglipModel from transformers' own random init (a tiny config), saved by transformers: from_hf
    gives a TwoTower with its outputs."""
    tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    text = dict(tower, vocab_size=300, max_position_embeddings=12, hidden_act="gelu")
    vision = dict(tower, image_size=24, patch_size=6, hidden_act="quick_gelu")
    torch.manual_seed(0)
    if arch == "CLIPModel":
        cfg = tf.CLIPConfig(
            text_config={**text, "eos_token_id": 299, "bos_token_id": 298, "pad_token_id": 0},
            vision_config=vision,
            projection_dim=20,
        )
    else:
        cfg = tf.SiglipConfig(text_config={**text, "projection_size": 32}, vision_config=vision)
    hf = getattr(tf, arch)(cfg)
    trained_like(hf)  # transformers' init zeroes biases and sets SigLIP's scale and bias to 0
    hf.save_pretrained(tmp_path)
    model = export.from_hf(tmp_path)
    assert hf_target(model) == arch and model.embed_dim == (20 if arch == "CLIPModel" else 32)
    x = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    ids, mask = captions(model, lengths=(12, 5))
    ours = tessera_embeddings(model, x, ids, mask)
    theirs = hf_outputs(hf.eval(), arch, x, ids, mask)
    for key, want in ours.items():
        torch.testing.assert_close(theirs[key], want, atol=ATOL, rtol=0, msg=key)


# (two_tower kwargs, what the error must name)
UNSUPPORTED = {
    "pvt_v2": (dict(image_tower="pvt_v2_test"), "'pvt_v2_test'"),
    "poolformer": (dict(image_tower="poolformer_test"), "'poolformer_test'"),
    "maxvit": (dict(image_tower="maxvit_test"), "'maxvit_test'"),
    "vit-avg": (
        dict(image_tower="vit_test_patch4", image_kwargs=dict(patch_size=8, depth=2, global_pool="avg")),
        "global_pool='avg'",
    ),
    "vit-tokens-and-map": (dict(image_kwargs={**CLIP_VIT, "global_pool": "map"}), "global_pool='map'"),
    "llama-text": (dict(text_tower="llama_test"), "'llama_test'"),
    "modernbert-text": (dict(text_tower="modernbert_test"), "'modernbert_test'"),
    "clip-logit-bias": (dict(init_logit_bias=-10.0), "logit_bias"),
    "clip-text-proj-bias": (dict(text_proj_bias=True), "text_proj_bias=True"),
    "clip-eos-2": (dict(eos_token_id=2), "eos_token_id=2"),
    "clip-vit-siglip-text": (dict(text_tower="siglip_text_test"), "'siglip_text_test'"),
    "siglip-image-proj": (dict(name="siglip_test", image_proj="linear"), "image_proj='linear'"),
    "siglip-text-mean": (dict(name="siglip_test", text_pool="mean"), "text_pool='mean'"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_towers_without_a_transformers_twin_are_refused_by_name(case, tmp_path):
    kwargs, named = UNSUPPORTED[case]
    model = two_tower(**kwargs)
    with pytest.raises(ValueError, match="no Hugging Face export") as err:
        export.to_hf(model, tmp_path)
    assert named in str(err.value) and "Exportable: CLIPModel" in str(err.value), str(err.value)
    assert not (tmp_path / "config.json").exists()


# ---- the folder a run's export writes: processor, tokenizer ------------------------------------------------

TEXT_LEN = 16
CAPTIONS = [
    "grinning face with big eyes",
    "a photo of a cat",
    "naïve café, 42 times!  " * 6,
]  # the last is cut


def emoji_data(**kw) -> DataConfig:
    return DataConfig(dataset="emoji", image_size=32, text_len=TEXT_LEN, **kw)


def run_model(name: str, info, image_tower: str | None = None) -> torch.nn.Module:
    """The model as pretrain/build.py sizes it for the run's tokenizer."""
    eos = info.eos_id if name == "clip_test" else None
    return two_tower(
        name,
        image_tower,
        vocab_size=info.vocab_size,
        context_length=TEXT_LEN,
        eos_token_id=eos,
        pad_token_id=info.padding_id,
    )


def png_at(tmp_path, size: int) -> str:
    path = tmp_path / f"rgb{size}.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8), "RGB").save(path)
    return str(path)


@pytest.mark.parametrize("name", ["clip_test", "siglip_test"])
def test_run_export_has_a_processor_giving_tesseras_inputs(name, tmp_path):
    """AutoProcessor of the folder (offline) is the target's processor: its tokenizer gives the data layer's ids
    (BOS ... EOS, cut to text_len keeping EOS, padded with the padding id; SigLIP: no attention_mask), its image
    processor the eval transform; through the HF model they give Tessera's logits."""
    from pretrain.data.image_text import tokenize_captions
    from pretrain.data.tokenizer import tokenizer_info
    from pretrain.data.transforms import ImageTransform
    from pretrain.hf_files import Preprocess

    data = emoji_data()
    info = tokenizer_info(data)
    model = run_model(name, info)
    out = tmp_path / "hf"
    export.to_hf(model, out, data=data)
    target = hf_target(model)
    proc = tf.AutoProcessor.from_pretrained(out)
    assert type(proc).__name__ == {"CLIPModel": "CLIPProcessor", "SiglipModel": "SiglipProcessor"}[target]
    assert type(proc.tokenizer).__name__ == "CLIPTokenizerFast"  # the CLIP BPE keeps its class
    ids, mask, truncated = tokenize_captions(CAPTIONS, info, TEXT_LEN)
    assert truncated == 1
    with Image.open(png_at(tmp_path, 32)) as im:
        pre = Preprocess.from_data(data)
        pixels = ImageTransform(32, pre.mean, pre.std)(im.convert("RGB")).unsqueeze(0)
        inputs = proc(text=CAPTIONS, images=im, return_tensors="pt", padding="max_length", truncation=True)
        fast = tf.AutoImageProcessor.from_pretrained(out)(im, return_tensors="pt")["pixel_values"]
    want_keys = {"input_ids", "pixel_values"} | ({"attention_mask"} if target == "CLIPModel" else set())
    assert set(inputs) == want_keys
    assert torch.equal(inputs["input_ids"], ids)
    if target == "CLIPModel":
        assert torch.equal(inputs["attention_mask"], mask)
    torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast, pixels, atol=1e-6, rtol=0)
    hf = getattr(tf, target).from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(**inputs).logits_per_image
    ours = tessera_embeddings(model, pixels, ids, mask)["logits_per_image"]
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    config = tf.AutoConfig.from_pretrained(out)
    assert config.text_config.eos_token_id == info.eos_id and config.architectures == [target]


def test_a_bare_tokenizer_json_is_exported_with_bos_and_eos(tmp_path):
    """A run tokenizer given as a bare tokenizer.json (no transformers config: e.g. data.tokenizer 'bpe'): the
    export adds the post-processor that writes [BOS] ids EOS, so AutoProcessor gives the data layer's ids. Its EOS
    is id 2, which CLIPModel cannot pool at: refused, naming it; SigLIP does not pool at EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from pretrain.data.image_text import tokenize_captions
    from pretrain.data.tokenizer import tokenizer_info

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    tok.train_from_iterator([c * 3 for c in CAPTIONS] + ["grinning smiling face with heart eyes"], trainer)
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    data = emoji_data(tokenizer=str(path))
    info = tokenizer_info(data)
    assert (info.bos_id, info.eos_id, info.padding_id) == (1, 2, 0)
    with pytest.raises(ValueError, match="eos_token_id=2"):
        export.to_hf(run_model("clip_test", info), tmp_path / "clip", data=data)
    export.to_hf(run_model("siglip_test", info), tmp_path / "siglip", data=data)
    proc = tf.AutoProcessor.from_pretrained(tmp_path / "siglip")
    got = proc(text=CAPTIONS, return_tensors="pt", padding="max_length", truncation=True)
    assert set(got) == {"input_ids"}
    assert torch.equal(got["input_ids"], tokenize_captions(CAPTIONS, info, TEXT_LEN)[0])


# ---- the model card: its loading snippet runs and gives Tessera's numbers -----------------------------------

CARD_TARGETS = {  # id: (config, two-tower size, image tower)
    "clip": ("clip_tiny.yaml", "clip_test", None),
    "siglip": ("siglip_tiny.yaml", "siglip_test", None),  # text_len 16: the card tells the pipeline
    "dual": ("clip_tiny.yaml", "clip_test", "swin_test"),
}


@pytest.mark.parametrize("case", list(CARD_TARGETS))
def test_model_card_snippet_runs_and_gives_tesseras_probabilities(case, tmp_path):
    """README.md's Python block, run as written (the image path replaced): `probs` are Tessera's softmax (CLIP,
    dual encoder) or sigmoid (SigLIP) over the two captions, and the zero-shot pipeline's scores (CLIP, SigLIP;
    for SigLIP at text_len 16 with the card's tokenizer_kwargs) are Tessera's too."""
    import re

    from pretrain.build import from_dict
    from pretrain.config import read_tree
    from pretrain.data.image_text import tokenize_captions
    from pretrain.data.tokenizer import tokenizer_info
    from pretrain.data.transforms import ImageTransform
    from pretrain.hf_files import Preprocess, image_text_model_card

    config, name, image_tower = CARD_TARGETS[case]
    info = tokenizer_info(emoji_data())
    model = run_model(name, info, image_tower)
    size = model.img_size
    cfg = from_dict(read_tree(str(ROOT / "configs" / config), [f"data.image_size={size}"]))
    data = cfg.data
    assert data.text_len == TEXT_LEN
    out = tmp_path / "hf"
    hf = export.to_hf(model, out, data=data)
    meta = dict(step=2, samples_seen=64, checkpoint="ckpt", world_size=1, engine="torch", precision="fp32")
    card = image_text_model_card(cfg, meta, hf, str(out), Preprocess.from_data(data), 3.25)
    assert f"({type(hf).__name__}) |" in card and "| final loss | 3.2500 at step 2 |" in card
    png = png_at(tmp_path, size)
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace('"image.png"', repr(png))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # prints the pipeline's scores
    texts = scope["texts"]
    with Image.open(png) as im:
        pre = Preprocess.from_data(data)
        pixels = ImageTransform(size, pre.mean, pre.std)(im.convert("RGB")).unsqueeze(0)
    ids, mask, _ = tokenize_captions(texts, info, TEXT_LEN)
    logits = tessera_embeddings(model, pixels, ids, mask)["logits_per_image"]
    want = logits.sigmoid() if hf_target(model) == "SiglipModel" else logits.softmax(-1)
    torch.testing.assert_close(scope["probs"], want, atol=ATOL, rtol=0)
    if "classify" in scope:  # the pipeline, called as the card calls it
        call = re.search(r"print\((classify\(.*\))\)", code).group(1)
        scores = eval(call, scope)
        prompts = [f"This is a photo of {label}." for label in ("cat", "dog")]
        p_ids, p_mask, _ = tokenize_captions(prompts, info, TEXT_LEN)
        logits = tessera_embeddings(model, pixels, p_ids, p_mask)["logits_per_image"][0]
        want = logits.sigmoid() if hf_target(model) == "SiglipModel" else logits.softmax(-1)
        got = torch.tensor(
            [next(s["score"] for s in scores if s["label"] == label) for label in ("cat", "dog")]
        )
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
