"""Load Tessera's Hugging Face exports in a *user's* transformers 5 and compare with Tessera's own outputs.

    .venv-tf5/bin/python -I tests/tf5_check.py MANIFEST.json

Run by tests/test_transformers5.py under .venv-tf5 (scripts/tf5-venv.sh), a venv without Tessera: this file
imports only transformers, torch, safetensors, PIL, json and the standard library, never this repository (it
checks that at the end). Prints one line per case, PASS or FAIL with the largest error, then the details of
every failure; exits 1 on any failure (2 on a bad manifest).

The manifest (written by tests/test_transformers5.py in Tessera's venv):

    {"atol": 1e-5,
     "cases": [{"name": "swin/swin_test/classes=7/2x3x64x64",
                "folder": "/abs/export",                   # what to_hf wrote: config.json, *.safetensors, ...
                "inputs": "/abs/inputs.safetensors",       # forward kwargs: pixel_values (+ noise for ViTMAE,
                                                           # + bool_masked_pos for a SimMIM export),
                                                           # or input_ids (int64) for a text model
                "expected": "/abs/expected.safetensors",   # Tessera's outputs, in the HF models' layouts
                "loads": [{"cls": "SwinForImageClassification",  # a transformers class or Auto class
                           "kwargs": {},                   # for from_pretrained, e.g. add_pooling_layer
                           "inputs": ["pixel_values"],     # which inputs the forward takes
                           "allow_unexpected": [],         # prefixes of checkpoint keys this class drops
                           "outputs": {"logits": "logits"}}],  # output field -> key in `expected`
                "image": {"png": "/abs/image.png", "expected": "processor_pixel_values", "atol": 1e-5},
                "pipeline": {"task": "image-classification", "png": "/abs/gray.png", "expected": "pipeline",
                             "labels": ["class 0", ...], "atol": 1e-5}}]}

A text export's case (LlamaForCausalLM / ModernBertForMaskedLM, written with the run's tokenizer) has instead

                "tokenizer": {"text": "The wolf ... <mask> ...",  # AutoTokenizer(text)["input_ids"] == ids
                              "ids": [56, 265, ...],              # Tessera's tokenizer's encoding of text
                              "decoded": "The wolf ...",          # AutoTokenizer.decode(ids) == this
                              "special_ids": {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "mask": 4}},
                                                                  # tokenizer.<role>_token_id (null: none)
                "pipeline": {"task": "fill-mask", "text": "a ... <mask> ...", "top_k": 5,
                             "token_ids": [...], "token_strs": [...],  # the top_k predictions, best first
                             "expected": "pipeline", "atol": 1e-5}     # their scores (softmax at the mask)
                         or {"task": "text-generation", "text": "a prompt",
                             "kwargs": {"max_new_tokens": 8, "do_sample": false},  # greedy
                             "token_ids": [...],            # return_tensors=True: prompt + continuation ids
                             "generated_text": "a prompt..."}  # the plain call's text

`image` is given where the folder holds preprocessor_config.json, `tokenizer` where it holds tokenizer.json,
each in one case per folder (a folder holding one that no case covers fails).

Every load must report no missing, mismatched or unexpected key and no error (`output_loading_info=True`); the
one exception is a base model loaded from a folder with a head (e.g. AutoModel from a
SwinForImageClassification export), whose unexpected keys may only be the head's (`allow_unexpected`, e.g.
"classifier."): the base model never has them. Its weights must be fp32 as loaded (no cast here), and it
runs in eval mode.

What the expected tensors are, in terms of Tessera's model (`ours`; tests/test_transformers5.py computes them
in Tessera's venv and cross-checks each against transformers 4.57 there):
  last_hidden_state  = ours.forward_features(x)  (ViT: (B, 1 + N, D) with the final norm; Swin/Swin V2:
                       (B, L, C), normed; ConvNeXt/V2, PVT v2, PoolFormer: the last stage's (B, C, h, w) map,
                       before the pooled norm)
  pooler_output      = ours.forward_head(features, pre_logits=True)  (ViTModel: the normed cls token through
                       the exported identity pooler; Swin/V2: token mean; ConvNeXt/V2: normed map mean; where
                       the HF model has one: not PvtV2Model, PoolFormerModel, or a ViTModel without pooler);
                       DeiTModel (a ViT with distill_token): features[:, 0], the normed cls token through its
                       identity pooler (Tessera's pooled features, the mean of the cls and distillation
                       tokens, are no DeiT output)
  logits             = ours(x)  (a classifier head; PoolFormer without one: its pooled features, as its
                       exported Identity classifier gives; DeiTForImageClassificationWithTeacher: the mean of
                       cls_logits, distillation_logits = ours.forward_head_distilled(features))
  MAE (ViTMAEForPreTraining, noise given): logits = Tessera's `pred`, loss, mask, ids_restore; ViTMAEModel's
                       last_hidden_state = the encoder on the kept tokens (Tessera's `latent`)
  SimMIM ({ViT,Swin,Swinv2}ForMaskedImageModeling, bool_masked_pos = Tessera's stem mask flattened, (B, L) bool):
                       reconstruction = Tessera's `pred`, loss = its loss; the base model loaded from that folder
                       with use_mask_token=True: last_hidden_state = ours.forward_features(x, mask); the folder's
                       encoder/ (the plain XModel, no mask token) as any backbone, unmasked
  pipeline           = Tessera's result on the PNG (its eval transform, then the model): class probabilities in
                       `labels` order (image-classification), or the encoder's features (image-feature-extraction);
                       fill-mask: the softmax of ours(ids)[mask position] at its top_k ids (ids: Tessera's
                       tokenizer on `text`); text-generation: no tensor, the ids of Tessera's greedy loop
                       (argmax of ours(ids)[-1], appended, max_new_tokens times or until EOS)
  Text models (input_ids): logits = ours(input_ids) (B, N, V); the base model's (LlamaModel, ModernBertModel)
                       last_hidden_state = ours.forward_features(input_ids) (after the final norm)
  processor_pixel_values = Tessera's eval transform (pretrain.data.transforms.ImageTransform: to [0, 1],
                       resize, normalize) of the PNG, which is at the processor's size already, with the
                       image_mean/image_std of the export's preprocessor_config.json
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

RESULT_FIELDS = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"shape {tuple(got.shape)} != expected {tuple(want.shape)}")
    if got.numel() == 0:
        return 0.0
    return (got.detach().double() - want.double()).abs().max().item()


def loading_problems(info: dict, allow_unexpected: list[str]) -> list[str]:
    problems = []
    for field in RESULT_FIELDS:
        if field not in info:
            problems.append(f"loading info has no {field!r} (fields: {sorted(info)})")
            continue
        keys = sorted(map(str, info[field]))
        if field == "unexpected_keys":
            keys = [k for k in keys if not any(k.startswith(p) for p in allow_unexpected)]
        if keys:
            problems.append(f"{field} ({len(keys)}): {keys[:12]}{' ...' if len(keys) > 12 else ''}")
    return problems


def run_load(case: dict, load: dict, inputs: dict, expected: dict, atol: float) -> tuple[float, list[str]]:
    """(largest error, problems) for one class loading one folder."""
    cls = getattr(transformers, load["cls"])
    model, info = cls.from_pretrained(case["folder"], output_loading_info=True, **load.get("kwargs", {}))
    problems = loading_problems(info, load.get("allow_unexpected", []))
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    if dtypes != ["torch.float32"]:
        problems.append(f"parameters load as {dtypes}, not float32")
    model = model.float().eval()
    kw = {name: inputs[name] for name in load["inputs"]}
    with torch.no_grad():
        out = model(**kw)
    worst = 0.0
    if not load["outputs"]:
        problems.append("the manifest names no output to compare")
    for field, key in load["outputs"].items():
        got = getattr(out, field, None)
        if got is None:
            problems.append(f"{field}: {type(model).__name__} returned none")
            continue
        try:
            err = max_err(got, expected[key])
        except AssertionError as e:
            problems.append(f"{field}: {e}")
            continue
        worst = max(worst, err)
        if not err <= atol:  # (NaN fails too)
            problems.append(f"{field}: max abs error {err:.3g} > {atol:g}")
    return worst, [f"{load['cls']} ({type(model).__name__}): {p}" for p in problems]


def run_image(case: dict, expected: dict) -> tuple[float, list[str]]:
    """AutoImageProcessor of the folder on the saved PNG vs Tessera's eval transform of it."""
    image = case["image"]
    proc = transformers.AutoImageProcessor.from_pretrained(case["folder"])
    with Image.open(image["png"]) as im:
        im.load()
        got = proc(images=im, return_tensors="pt")["pixel_values"]
    return compare(f"AutoImageProcessor ({type(proc).__name__}): pixel_values", got, expected, image)


def compare(name: str, got: torch.Tensor, expected: dict, spec: dict) -> tuple[float, list[str]]:
    """(max abs error, problems) of `got` against expected[spec["expected"]] within spec["atol"]."""
    try:
        err = max_err(got, expected[spec["expected"]])
    except AssertionError as e:
        return 0.0, [f"{name}: {e}"]
    if not err <= spec["atol"]:
        return err, [f"{name}: max abs error {err:.3g} > {spec['atol']:g}"]
    return err, []


def run_tokenizer(case: dict, expected: dict) -> tuple[float, list[str]]:
    """AutoTokenizer of the folder vs Tessera's tokenizer: the ids of `text` (as a user calls it, with its
    defaults), the decoding of those ids, the special tokens' ids."""
    spec = case["tokenizer"]
    tok = transformers.AutoTokenizer.from_pretrained(case["folder"])
    got = dict(
        ids=tok(spec["text"])["input_ids"],
        decoded=tok.decode(spec["ids"]),
        special_ids={role: getattr(tok, f"{role}_token_id") for role in spec["special_ids"]},
    )
    name = f"AutoTokenizer ({type(tok).__name__})"
    return 0.0, [f"{name}: {k} {v!r}, Tessera's {spec[k]!r}" for k, v in got.items() if v != spec[k]]


def run_text_pipeline(case: dict, expected: dict) -> tuple[float, list[str]]:
    """transformers' fill-mask / text-generation pipeline on the folder, as a user runs it, vs Tessera's model:
    the top_k token ids (in order), their strings and scores; the greedy ids (prompt + continuation) and text."""
    spec = case["pipeline"]
    pipe = transformers.pipeline(spec["task"], model=case["folder"])
    name = f"pipeline({spec['task']!r})"
    err, problems = 0.0, []
    if spec["task"] == "fill-mask":
        out = pipe(spec["text"], top_k=spec["top_k"])
        got = dict(token_ids=[d["token"] for d in out], token_strs=[d["token_str"] for d in out])
        if got["token_ids"] == spec["token_ids"]:  # (else the scores are of other tokens)
            err, problems = compare(
                f"{name}: scores", torch.tensor([d["score"] for d in out]), expected, spec
            )
    elif spec["task"] == "text-generation":
        got = dict(
            token_ids=pipe(spec["text"], return_tensors=True, **spec["kwargs"])[0]["generated_token_ids"],
            generated_text=pipe(spec["text"], **spec["kwargs"])[0]["generated_text"],
        )
    else:
        return 0.0, [f"{name}: not a text task this checker knows"]
    got = {k: list(map(int, v)) if k == "token_ids" else v for k, v in got.items()}
    problems += [f"{name}: {k} {v!r}, Tessera's {spec[k]!r}" for k, v in got.items() if v != spec[k]]
    return err, problems


def run_pipeline(case: dict, expected: dict) -> tuple[float, list[str]]:
    """transformers' pipeline on the folder and the saved PNG, as a user runs it, vs Tessera's result:
    image-classification scores under the exported class names (expected: probabilities in `labels` order),
    image-feature-extraction features. A text pipeline (`text`, no `png`): run_text_pipeline."""
    spec = case["pipeline"]
    if "text" in spec:
        return run_text_pipeline(case, expected)
    labels = spec.get("labels")
    kwargs = spec.get("kwargs", {"top_k": len(labels)} if labels else {})  # zero-shot: candidate_labels
    out = transformers.pipeline(spec["task"], model=case["folder"])(spec["png"], **kwargs)
    name = f"pipeline({spec['task']!r})"
    if labels:
        if sorted(d["label"] for d in out) != sorted(labels):
            return 0.0, [f"{name}: labels {[d['label'] for d in out]}, exported {labels}"]
        got = torch.tensor([next(d["score"] for d in out if d["label"] == label) for label in labels])
    else:
        got = torch.tensor(out)
    return compare(name, got, expected, spec)


def run_case(case: dict, atol: float) -> tuple[float, list[str], list[str]]:
    """(largest error, what was checked, problems)."""
    inputs, expected = load_file(case["inputs"]), load_file(case["expected"])
    worst, checked, problems = 0.0, [], []
    if not case["loads"]:
        problems.append("the manifest names no class to load the folder with")
    for load in case["loads"]:
        checked.append(load["cls"])
        try:
            err, found = run_load(case, load, inputs, expected, atol)
        except Exception:
            err, found = 0.0, [f"{load['cls']}: raised\n{traceback.format_exc()}"]
        worst, problems = max(worst, err), problems + found
    for key, run, what in (
        ("image", run_image, "AutoImageProcessor"),
        ("tokenizer", run_tokenizer, "AutoTokenizer"),
        ("pipeline", run_pipeline, "pipeline"),
    ):
        if case.get(key):
            checked.append(f"pipeline({case[key]['task']!r})" if key == "pipeline" else what)
            try:
                err, found = run(case, expected)
            except Exception:
                err, found = 0.0, [f"{what}: raised\n{traceback.format_exc()}"]
            worst, problems = max(worst, err), problems + found
    return worst, checked, problems


def foreign_modules() -> list[str]:
    """Modules imported from this checkout (other than this file and the venv inside it): must be none."""
    root = Path(__file__).resolve().parents[1]
    venv, me = Path(sys.prefix).resolve(), Path(__file__).resolve()
    found = []
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None)
        if not path:
            continue
        p = Path(path).resolve()
        if p != me and p.is_relative_to(root) and not p.is_relative_to(venv):
            found.append(f"{name} ({p})")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: tf5_check.py MANIFEST.json", file=sys.stderr)
        return 2
    manifest = json.loads(Path(argv[0]).read_text())
    atol = float(manifest.get("atol", 1e-5))
    cases = manifest.get("cases") or []
    if not cases:
        print("error: the manifest lists no case", file=sys.stderr)
        return 2
    torch.manual_seed(0)  # (nothing here draws randomness: MAE's noise is an input; kept for determinism)
    print(
        f"transformers {transformers.__version__} | torch {torch.__version__} | "
        f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')} | {len(cases)} cases | atol {atol:g}"
    )
    failed = []
    width = max(len(c["name"]) for c in cases)
    for case in cases:
        worst, checked, problems = run_case(case, atol)
        status = "FAIL" if problems else "PASS"
        print(
            f"{status} {case['name']:<{width}}  max abs err {worst:.2e}  [{', '.join(checked)}]", flush=True
        )
        if problems:
            failed.append((case, problems))
    # a folder's preprocessor_config.json / tokenizer.json is checked once, with the case that gives an image /
    # a tokenizer sentence
    for file, key, what in (
        ("preprocessor_config.json", "image", "(image processors)"),
        ("tokenizer.json", "tokenizer", "(tokenizers)"),
    ):
        unchecked = sorted(
            {c["folder"] for c in cases if (Path(c["folder"]) / file).is_file()}
            - {c["folder"] for c in cases if c.get(key)}
        )
        if unchecked:
            failed.append(({"name": what}, [f"{file}, no {key}: {unchecked}"]))
    foreign = foreign_modules()
    if foreign:
        failed.append(({"name": "(isolation)"}, [f"imported from the repository: {foreign}"]))
    print(f"{len(cases) - sum('folder' in c for c, _ in failed)}/{len(cases)} cases passed")
    for case, problems in failed:
        print(f"\n--- FAIL {case['name']} ({case.get('folder', '')})")
        for p in problems:
            print("  " + p.replace("\n", "\n    "))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
