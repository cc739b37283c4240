"""What an exported Hugging Face folder holds besides weights: the image processor that repeats the run's own
eval preprocessing, class names for classifiers, and a model card written from the run's own numbers.

With these, `AutoImageProcessor.from_pretrained(OUT)`, `pipeline("image-feature-extraction", model=OUT)` and
(for classifiers) `pipeline("image-classification", model=OUT)` work offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from models.hf import GRAY_FROM_RGB
from pretrain.data.config import DataConfig
from pretrain.data.sources import get_dataset

PIL_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as transformers stores `resample`


@dataclass(frozen=True)
class Preprocess:
    """Tessera's eval transform (pretrain.data.transforms.ImageTransform, augment off): the image converted to
    the dataset's mode (L or RGB), resized to size x size (bilinear, antialiased; no crop, aspect not kept),
    scaled to [0, 1], normalized per channel."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    gray_from_rgb: bool = False  # a grayscale run's model taking RGB (models.hf.rgb_from_gray)

    @classmethod
    def from_data(cls, data: DataConfig) -> Preprocess:
        info = get_dataset(data.dataset)
        return cls(data.image_size, info.channels, tuple(data.mean or info.mean), tuple(data.std or info.std))

    def for_pipelines(self) -> Preprocess:
        """What a folder for transformers' pipelines (which feed RGB) takes: a grayscale run's model converted to
        take RGB (models.hf.rgb_from_gray), every channel normalized alike; any other run's, unchanged."""
        if self.channels != 1:
            return self
        return Preprocess(self.image_size, 3, self.mean * 3, self.std * 3, gray_from_rgb=True)

    def describe(self) -> str:
        if self.gray_from_rgb:
            mode = (
                "RGB (a gray image is taken as R = G = B); the model's first layer converts to grayscale with "
                f"PIL's weights {list(GRAY_FROM_RGB)}, as the run's data was"
            )
        else:
            mode = "grayscale (1 channel, PIL mode `L`)" if self.channels == 1 else "RGB (3 channels)"
        return (
            f"{mode}, resized to {self.image_size}x{self.image_size} (bilinear), scaled to [0, 1], "
            f"normalized with mean {list(self.mean[:1] if self.gray_from_rgb else self.mean)} and std "
            f"{list(self.std[:1] if self.gray_from_rgb else self.std)}"
        )


def write_image_processor(folder: Path, pre: Preprocess):
    """preprocessor_config.json for transformers' ViT image processor (every family: it does exactly this
    transform). The torchvision-backed ("fast") class: transformers 4.57's PIL one cannot read grayscale images,
    and transformers 5 loads this name as its default class."""
    from ops.compat import import_transformers

    processor = import_transformers().ViTImageProcessorFast(**image_processor_kwargs(pre))
    processor.save_pretrained(str(folder))
    return processor


def image_processor_kwargs(pre: Preprocess) -> dict:
    """What every exported image processor does (ViT's, CLIP's, SigLIP's fast classes take these alike):
    Tessera's eval transform."""
    return dict(
        do_resize=True,
        size={"height": pre.image_size, "width": pre.image_size},
        resample=PIL_BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(pre.mean),
        image_std=list(pre.std),
        do_convert_rgb=pre.channels == 3,  # RGBA / gray inputs become RGB, as Tessera's converter does
    )


def set_labels(hf_model: nn.Module, labels: list[str] | None) -> bool:
    """Name a classifier's outputs (config id2label / label2id). False when it has none or the names don't fit."""
    n = getattr(hf_model.config, "num_labels", 0)
    if not labels or not is_image_classifier(hf_model) or len(labels) != n:
        return False
    hf_model.config.id2label = dict(enumerate(labels))
    hf_model.config.label2id = {name: i for i, name in enumerate(labels)}
    return True


def is_image_classifier(hf_model: nn.Module) -> bool:
    """<Family>ForImageClassification, or DeiTForImageClassificationWithTeacher (DeiT's two heads)."""
    return type(hf_model).__name__.endswith(("ForImageClassification", "ForImageClassificationWithTeacher"))


def class_names(data: dict, meta: dict) -> list[str] | None:
    """The run's class names: recorded in the checkpoint at training time, else the dataset's own."""
    if meta.get("classes"):
        return list(meta["classes"])
    try:
        return get_dataset(data["dataset"]).class_names(data.get("split", "train"), data.get("source"))
    except Exception:  # a source folder that is gone, an unregistered dataset: the names are optional
        return None


def final_loss(meta: dict) -> float | None:
    """The loss of the checkpoint's step: in its meta (since it was recorded there), else the run's metrics."""
    if meta.get("loss") is not None:
        return float(meta["loss"])
    metrics = Path(meta["checkpoint"]).parent.parent / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step") == meta["step"]:
                return float(row["loss"])
    return None


# --- model card ------------------------------------------------------------------------------------------


def _loading(arch: str, out: str, mae: bool, pipeline_task: str, gray: bool) -> str:
    image = 'Image.open("image.png")'
    if mae:
        return f"""```python
from PIL import Image
from transformers import ViTMAEForPreTraining, ViTModel, pipeline

mae = ViTMAEForPreTraining.from_pretrained("{out}")         # encoder + decoder, as pretrained
encoder = ViTModel.from_pretrained("{out}/encoder")         # the encoder alone (no missing or unexpected keys)
extract = pipeline("image-feature-extraction", model="{out}/encoder")
features = extract({image})  # [1][1 + patches][hidden]: the final-norm tokens, cls first
```
`pipeline(..., pool=True)` returns the cls token (the encoder's pooler is the identity).""" + (
            "\n\nThe pretraining model takes what the run trained on: 1-channel `pixel_values` (its processor "
            "reads PIL images in mode `L`). The encoder folder takes RGB, as pipelines give it: see the input row."
            if gray
            else ""
        )
    lines = [
        "```python",
        "from PIL import Image",
        f"from transformers import {arch}, pipeline",
        "",
        f'model = {arch}.from_pretrained("{out}")  # loads with no missing or unexpected keys',
    ]
    if pipeline_task == "image-classification":
        lines += [f'classify = pipeline("image-classification", model="{out}")', f"print(classify({image}))"]
    else:
        lines += [
            f'extract = pipeline("image-feature-extraction", model="{out}")',
            f"features = extract({image})",
        ]
    lines.append("```")
    text = "\n".join(lines)
    if arch.startswith("PoolFormer"):
        text += (
            f"\n\nPoolFormer exports always use `{arch}`: transformers' `PoolFormerModel` has no final norm, so it "
            "(and `AutoModel`, which the feature-extraction pipeline uses) loads this folder with `norm.*` (and "
            "`classifier.*`) reported as unused; its `last_hidden_state` is still the same features."
        )
    return text


def _card_head(cfg, task: str, objective: str, n_params: int) -> str:
    """A model card's front matter, title and the table's first lines, up to "as <where it is>"."""
    return f"""---
library_name: transformers
pipeline_tag: {task}
tags:
- tessera
- {objective}
- {cfg.model.name}
---

# {cfg.model.name} ({objective}) trained with Tessera

| | |
|---|---|
| model | `{cfg.model.name}` ({n_params / 1e6:.2f}M parameters as exported), as """


def model_card(
    cfg,
    meta: dict,
    hf_model: nn.Module,
    out_dir: str,
    pre: Preprocess,
    labels_set: bool,
    loss: float | None,
) -> str:
    """README.md of an export: what was trained and how to load it, every number read from the run (`pre`: the
    run's own preprocessing; the folders hold what `pretrain.export.to_hf` made of it)."""
    from pretrain.objectives import objective_name

    arch = type(hf_model).__name__
    mae = arch == "ViTMAEForPreTraining"  # keeps the run's channels; its encoder/ is for pipelines
    gray_run = pre.channels == 1
    if mae and gray_run:
        pre_text = f"{pre.describe()}; `encoder/`: {pre.for_pipelines().describe()}"
    else:
        pre_text = pre.for_pipelines().describe()
    task = pipeline_task(hf_model)
    objective = objective_name(cfg.objective)
    obj_args = ", ".join(f"{k}={v}" for k, v in vars(cfg.objective).items())
    n_params = sum(p.numel() for p in hf_model.parameters())
    data = cfg.data
    total = get_dataset(data.dataset).count(data.split, data.source) if data.max_samples is None else None
    count = data.max_samples or total
    epochs = f" (about {meta['samples_seen'] / count:.2f} epochs of {count:,} samples)" if count else ""
    loss_text = f"{loss:.4f} at step {meta['step']}" if loss is not None else "not recorded"
    batch = meta["samples_seen"] // meta["step"] if meta.get("step") else None
    folders = f"`{out_dir}` ({arch})" + (f" and `{out_dir}/encoder` (ViTModel)" if mae else "")
    labels_line = ""
    if task == "image-classification":
        names = list(hf_model.config.id2label.values())
        where = "" if labels_set else " (the run's dataset has no class names)"
        labels_line = f"| classes | {len(names)}{where}: {', '.join(names)} |\n"
    return (
        _card_head(cfg, task, objective, n_params)
        + f"""{folders} |
| objective | `{objective}` ({obj_args}) |
| data | `{data.dataset}`, split `{data.split}`{epochs} |
| input | {pre_text}: `preprocessor_config.json` does this |
{labels_line}| training | {meta["step"]:,} optimizer steps, {meta["samples_seen"]:,} samples seen{f", {batch:,} per step" if batch else ""}, {meta.get("world_size", 1)} rank(s), engine `{meta.get("engine")}` ZeRO-{meta.get("zero_stage", 0)} {meta.get("precision")} |
| final loss | {loss_text} |
| checkpoint | `{meta["checkpoint"]}` |

## How to load

{_loading(arch, out_dir, mae, task, gray_run)}

Exported by `python -m pretrain.export`; `tessera.json` holds the checkpoint's metadata and the run's data
config. Outputs equal Tessera's own to 1e-5 in fp32 (tests/test_hf_parity.py).
"""
    )


def pipeline_task(hf_model: nn.Module) -> str:
    """The transformers pipeline an exported model serves: a classifier (a head with outputs; PoolFormer exports
    its headless backbones as a classification model with no labels) or a feature extractor."""
    is_classifier = is_image_classifier(hf_model)
    return (
        "image-classification"
        if is_classifier and hf_model.config.num_labels > 0
        else "image-feature-extraction"
    )


# --- text exports ----------------------------------------------------------------------------------------


def text_model_card(cfg, meta: dict, hf_model: nn.Module, out_dir: str, loss: float | None) -> str:
    """README.md of a text export (LlamaForCausalLM or ModernBertForMaskedLM + the run's tokenizer)."""
    from pretrain.objectives import objective_name

    arch = type(hf_model).__name__
    causal = arch.endswith("ForCausalLM")
    task = "text-generation" if causal else "fill-mask"
    objective = objective_name(cfg.objective)
    obj_args = ", ".join(f"{k}={v}" for k, v in vars(cfg.objective).items())
    n_params = sum(p.numel() for p in hf_model.parameters())
    data = cfg.data
    tokens = meta["samples_seen"] * data.seq_len
    loss_text = f"{loss:.4f} at step {meta['step']}" if loss is not None else "not recorded"
    auto = "AutoModelForCausalLM" if causal else "AutoModelForMaskedLM"
    if causal:
        use = [
            f'generate = pipeline("text-generation", model="{out_dir}")',
            'print(generate("the", max_new_tokens=20, do_sample=False)[0]["generated_text"])',
        ]
    else:
        use = [
            f'fill = pipeline("fill-mask", model="{out_dir}")',
            'print(fill(f"a {fill.tokenizer.mask_token} of the"))',
        ]
    loading = "\n".join(
        [
            "```python",
            f"from transformers import AutoTokenizer, {auto}, pipeline",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{out_dir}")',
            f'model = {auto}.from_pretrained("{out_dir}")  # {arch}, no missing or unexpected keys',
            *use,
            "```",
        ]
    )
    return (
        _card_head(cfg, task, objective, n_params)
        + f"""`{out_dir}` ({arch}) |
| objective | `{objective}` ({obj_args}) |
| data | `{data.dataset}`, split `{data.split}`, packed rows of {data.seq_len} tokens (documents never attend to each other) |
| tokenizer | the run's own (`tokenizer.json`, vocabulary {hf_model.config.vocab_size:,} ids in the model) |
| training | {meta["step"]:,} optimizer steps, {meta["samples_seen"]:,} rows = {tokens:,} token slots seen, {meta.get("world_size", 1)} rank(s), engine `{meta.get("engine")}` ZeRO-{meta.get("zero_stage", 0)} {meta.get("precision")} |
| final loss | {loss_text} |
| checkpoint | `{meta["checkpoint"]}` |

## How to load

{loading}

Exported by `python -m pretrain.export`; `tessera.json` holds the checkpoint's metadata and the run's data
config. Logits equal Tessera's own to 1e-4 in fp32 (tests/test_llama.py, tests/test_modernbert.py).
"""
    )


# --- image-text exports (CLIPModel, SiglipModel, VisionTextDualEncoderModel) ---------------------------------

# per target: (processor class, image processor class); AutoProcessor finds the processor by config.json's
# model_type, the image processor by preprocessor_config.json's image_processor_type
IMAGE_TEXT_PROCESSORS = {
    "CLIPModel": ("CLIPProcessor", "CLIPImageProcessorFast"),
    "SiglipModel": ("SiglipProcessor", "SiglipImageProcessorFast"),
    "VisionTextDualEncoderModel": ("VisionTextDualEncoderProcessor", "ViTImageProcessorFast"),
}
# captions the export's tokenizer is checked on against Tessera's data layer (one longer than any text_len here)
PROBE_CAPTIONS = ("a photo of a cat", "Grinning Face With Smiling Eyes: naïve café, 42 times!  " * 12)


def text_input_names(arch: str) -> list[str]:
    """What the processor's tokenizer returns: SiglipModel gets no attention_mask, so it runs its text tower on the
    whole padded row as Tessera does (SigLIP attends to its padding); the others get one (CLIP's causal tower pools
    at the EOS, before any padding, so the mask changes nothing there)."""
    return ["input_ids"] if arch == "SiglipModel" else ["input_ids", "attention_mask"]


def image_text_tokenizer(info, text_len: int, input_names: list[str]):
    """The run's tokenizer as a transformers tokenizer that encodes a caption exactly as Tessera's data layer does
    ([BOS] ids EOS, cut to text_len keeping EOS last, padded with the padding id) under
    `padding="max_length", truncation=True` (model_max_length = text_len), returning only `input_names`.
    A folder with its own tokenizer_config.json (the CLIP BPE: CLIPTokenizerFast) keeps its class; a bare
    tokenizer.json gets a post-processor adding BOS / EOS. RuntimeError when it still encodes differently."""
    import os

    from ops.compat import import_transformers
    from pretrain.data.image_text import tokenize_captions
    from pretrain.data.tokenizer import load_tokenizer

    tf = import_transformers()
    folder = os.path.dirname(info.path)
    common = dict(
        model_max_length=text_len,
        model_input_names=list(input_names),
        padding_side="right",
        truncation_side="right",
    )
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        tok = tf.AutoTokenizer.from_pretrained(folder, **common)
    else:
        from tokenizers.processors import TemplateProcessing

        raw = load_tokenizer(info.path)
        eos = raw.id_to_token(info.eos_id)
        roles = {"eos_token": eos, "pad_token": raw.id_to_token(info.padding_id)}
        single, special = f"$A:0 {eos}:0", [(eos, info.eos_id)]
        if info.bos_id is not None:
            bos = raw.id_to_token(info.bos_id)
            single, special, roles["bos_token"] = f"{bos}:0 {single}", [(bos, info.bos_id), *special], bos
        if info.unk_id is not None:
            roles["unk_token"] = raw.id_to_token(info.unk_id)
        raw.post_processor = TemplateProcessing(single=single, special_tokens=special)
        tok = tf.PreTrainedTokenizerFast(tokenizer_object=raw, **roles, **common)
    if tok.pad_token_id != info.padding_id:  # Tessera pads with the pad token, else EOS
        tok.pad_token = tok.convert_ids_to_tokens(info.padding_id)
    want = tokenize_captions(list(PROBE_CAPTIONS), info, text_len)[0].tolist()
    got = tok(list(PROBE_CAPTIONS), padding="max_length", truncation=True)
    if got["input_ids"] != want or sorted(got) != sorted(input_names):
        raise RuntimeError(
            f"{info.path}: the exported {type(tok).__name__} encodes {PROBE_CAPTIONS[0]!r} / a long caption as "
            f"{got['input_ids']} ({sorted(got)}), Tessera's data layer as {want}: not exportable as is"
        )
    return tok


def write_image_text_processor(folder: Path, arch: str, pre: Preprocess, info, text_len: int):
    """The processor of an image-text export (CLIPProcessor / SiglipProcessor / VisionTextDualEncoderProcessor:
    the image processor repeating the run's eval transform + the run's tokenizer), saved so that
    `AutoProcessor.from_pretrained(folder)` loads it offline; returns it."""
    from ops.compat import import_transformers

    tf = import_transformers()
    proc_name, image_name = IMAGE_TEXT_PROCESSORS[arch]
    kwargs = image_processor_kwargs(pre)
    if image_name == "CLIPImageProcessorFast":
        kwargs["do_center_crop"] = False  # Tessera resizes to size x size, no crop
    image = getattr(tf, image_name)(**kwargs)
    tokenizer = image_text_tokenizer(info, text_len, text_input_names(arch))
    processor = getattr(tf, proc_name)(image_processor=image, tokenizer=tokenizer)
    processor.save_pretrained(str(folder))
    return processor


def _image_text_loading(arch: str, out: str, text_len: int) -> str:
    """The model card's loading snippet for an image-text export."""
    pad = 'padding="max_length", truncation=True'
    lines = [
        "```python",
        "import torch",
        "from PIL import Image",
        f"from transformers import AutoProcessor, {arch}" + (", pipeline" if arch != TARGET_DUAL else ""),
        "",
        f'model = {arch}.from_pretrained("{out}")  # loads with no missing or unexpected keys',
        f'processor = AutoProcessor.from_pretrained("{out}")',
        'texts = ["a photo of a cat", "a photo of a dog"]',
        'inputs = processor(text=texts, images=Image.open("image.png"), return_tensors="pt",',
        f"                   {pad})",
    ]
    if arch == TARGET_DUAL:
        lines += [
            "with torch.no_grad():  # transformers 5: model(**inputs).logits_per_image gives the same",
            "    image = model.visual_projection(model.vision_model(pixel_values=inputs.pixel_values).pooler_output)",
            "    text = model.text_projection(model.text_model(input_ids=inputs.input_ids,",
            "                                                  attention_mask=inputs.attention_mask).pooler_output)",
            "    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)",
            "    probs = (model.logit_scale.exp() * image @ text.T).softmax(-1)",
            "```",
            "",
            "transformers 4.x's `VisionTextDualEncoderModel.forward` passes `token_type_ids` to its text tower, which "
            "`CLIPTextModel` rejects: call the towers and projections as above (what the forward computes). It has no "
            "zero-shot pipeline.",
        ]
        return "\n".join(lines)
    sigmoid = arch == "SiglipModel"
    lines += [
        "with torch.no_grad():",
        f"    probs = model(**inputs).logits_per_image.{'sigmoid()' if sigmoid else 'softmax(-1)'}",
        f'classify = pipeline("zero-shot-image-classification", model="{out}")',
    ]
    if sigmoid and text_len != SIGLIP_PIPELINE_LEN:  # (transformers 4.x; 5.x ignores tokenizer_kwargs)
        lines.append(
            f'print(classify("image.png", candidate_labels=["cat", "dog"], tokenizer_kwargs={{"padding": '
            f'"max_length", "max_length": {text_len}, "truncation": True}}))'
        )
    else:
        lines.append('print(classify("image.png", candidate_labels=["cat", "dog"]))')
    lines.append("```")
    text = "\n".join(lines)
    if sigmoid:
        text += (
            f"\n\nSiglipModel pools its text tower at the last position: pad every caption to the run's {text_len} "
            'tokens (`padding="max_length"`) and pass no attention_mask (the processor returns none). '
        )
        if text_len == SIGLIP_PIPELINE_LEN:
            text += f"The pipeline pads its prompts to {SIGLIP_PIPELINE_LEN} tokens, the run's length."
        else:
            text += (
                f"The pipeline pads its prompts to {SIGLIP_PIPELINE_LEN} tokens unless told the run's {text_len}: "
                "transformers 4.x takes `tokenizer_kwargs` as above; transformers 5 ignores them, so there score "
                "with the processor and the model as above."
            )
    return text


SIGLIP_PIPELINE_LEN = 64  # transformers' zero-shot pipeline pads SigLIP prompts to this many tokens
TARGET_DUAL = "VisionTextDualEncoderModel"


def image_text_model_card(
    cfg, meta: dict, hf_model: nn.Module, out_dir: str, pre: Preprocess, loss: float | None
) -> str:
    """README.md of an image-text export: what was trained, its inputs and how to load it, from the run."""
    from pretrain.objectives import objective_name

    arch = type(hf_model).__name__
    objective = objective_name(cfg.objective)
    obj_args = ", ".join(f"{k}={v}" for k, v in vars(cfg.objective).items())
    n_params = sum(p.numel() for p in hf_model.parameters())
    data = cfg.data
    task = "feature-extraction" if arch == TARGET_DUAL else "zero-shot-image-classification"
    loss_text = f"{loss:.4f} at step {meta['step']}" if loss is not None else "not recorded"
    batch = meta["samples_seen"] // meta["step"] if meta.get("step") else None
    note = ""
    if objective == "filip":
        note = (
            "\n\nFILIP trained token-wise similarities (late interaction over patch and word tokens); "
            f"{arch} scores the pooled embeddings, which the FILIP loss did not train directly.\n"
        )
    return (
        _card_head(cfg, task, objective, n_params)
        + f"""`{out_dir}` ({arch}) |
| objective | `{objective}` ({obj_args}) |
| data | `{data.dataset}`, split `{data.split}`: image-caption pairs |
| images | {pre.describe()}: `preprocessor_config.json` does this |
| captions | the run's tokenizer: [BOS] ids EOS, cut to {data.text_len} tokens keeping EOS last, padded to {data.text_len} |
| training | {meta["step"]:,} optimizer steps, {meta["samples_seen"]:,} pairs seen{f", {batch:,} per step" if batch else ""}, {meta.get("world_size", 1)} rank(s), engine `{meta.get("engine")}` ZeRO-{meta.get("zero_stage", 0)} {meta.get("precision")} |
| final loss | {loss_text} |
| checkpoint | `{meta["checkpoint"]}` |

## How to load

{_image_text_loading(arch, out_dir, data.text_len)}
{note}
Exported by `python -m pretrain.export`; `tessera.json` holds the checkpoint's metadata and the run's data
config. Image and text embeddings and logits equal Tessera's own to 1e-5 in fp32 (tests/test_two_tower_export.py).
"""
    )
