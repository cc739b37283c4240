"""Every ```python snippet in README.md and docs/*.md runs as written, in a fresh interpreter of the venv, from a
folder holding what the docs' commands would have made (tiny stand-ins: the demo's and the classification
example's exports, made through the same CLI)."""

import re
import subprocess
import sys

import pytest

from pretrain import export
from pretrain.train import main
from tests.conftest import ROOT, tiny_args

pytestmark = pytest.mark.usefixtures("hf_offline")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPETS = [
    pytest.param(code, id=f"{path.name}:{text[: m.start()].count(chr(10)) + 1}")
    for path in DOCS
    for text in [path.read_text()]
    for m in re.finditer(r"```python\n(.*?)```", text, re.S)
    for code in [m.group(1)]
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, digits_shards):
    """out/demo_hf (an MAE export, as scripts/demo.sh makes), out/classify_hf and out/swin_hf (classification
    exports, as README and docs/backbones.md make), out/clm_tiny_hf and out/mlm_tiny_hf (text exports, as
    docs/text.md makes), out/simmim_swin_hf (a SimMIM export, as docs/mim.md makes), out/clip_tiny_hf (a CLIPModel
    export, as docs/contrastive.md makes), out/deit_tiny_hf (a DeiT export, as docs/distill.md makes), from a few steps of the tiny configs."""
    root = tmp_path_factory.mktemp("docs")
    classify = str(ROOT / "configs" / "classify_tiny.yaml")
    runs = {"demo_hf": tiny_args(root / "runs" / "demo_hf", digits_shards, "train.max_steps=2")}
    for out, name in (("classify_hf", "convnext_test"), ("swin_hf", "swin_test")):
        runs[out] = [
            classify,
            "--set",
            f"model.name={name}",
            "--set",
            f"run.output_dir={root / 'runs' / out}",
        ]
        runs[out] += ["--set", f"data.local={digits_shards}", "--set", "run.progress=false"]
        runs[out] += ["--set", "train.max_steps=2"]
    for out, config in (("clm_tiny_hf", "clm_tiny.yaml"), ("mlm_tiny_hf", "mlm_tiny.yaml")):  # docs/text.md
        runs[out] = [str(ROOT / "configs" / config), "--set", f"run.output_dir={root / 'runs' / out}"]
        runs[out] += ["--set", "run.progress=false", "--set", "train.max_steps=2"]
    runs["simmim_swin_hf"] = [str(ROOT / "configs" / "simmim_swin_tiny.yaml"), "--set", "train.max_steps=2"]
    runs["simmim_swin_hf"] += [
        "--set",
        f"run.output_dir={root / 'runs' / 'simmim_swin_hf'}",
        "--set",
        "run.progress=false",
    ]
    runs["simmim_swin_hf"] += ["--set", f"data.local={digits_shards}"]  # docs/mim.md
    runs["clip_tiny_hf"] = [
        str(ROOT / "configs" / "clip_tiny.yaml"),
        "--set",
        "train.max_steps=2",
    ]  # contrastive.md
    runs["clip_tiny_hf"] += [
        "--set",
        f"run.output_dir={root / 'runs' / 'clip_tiny_hf'}",
        "--set",
        "run.progress=false",
    ]
    runs["deit_tiny_hf"] = [str(ROOT / "configs" / "deit_tiny.yaml")]  # docs/distill.md
    runs["deit_tiny_hf"] += [
        "--set",
        f"run.output_dir={root / 'runs' / 'deit_tiny_hf'}",
        "--set",
        "run.progress=false",
    ]
    runs["deit_tiny_hf"] += ["--set", f"data.local={digits_shards}", "--set", "train.max_steps=2"]
    for out, args in runs.items():
        assert main(args) == 0
        assert export.main([str(root / "runs" / out), str(root / "out" / out)]) == 0
    return root


def test_docs_have_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("code", SNIPPETS)
def test_snippet_runs_as_written(code, workdir):
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"--- snippet\n{code}\n--- stderr\n{proc.stderr[-4000:]}"
