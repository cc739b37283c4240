"""README's family x objective table is what the registries say: every image family's `_test` model, built on
the meta device, against every objective's `supports` (the same check `load_config` refuses configs with)."""

from pathlib import Path

import torch

from models import MODELS, create_model, list_models
from pretrain.objectives import OBJECTIVES, objectives_for

ROOT = Path(__file__).resolve().parents[1]
MASKED = ("mae", "simmim", "spark", "fcmae")  # masked image modeling, then the rest of the image objectives


def family_rows() -> list[tuple[str, list[str]]]:
    """(family class name, objectives that train its `_test` model) for every image family, registry order."""
    rows, seen = [], set()
    for name in list_models("*_test*"):
        cls = MODELS.get(name).builds
        if getattr(cls, "modality", "image") != "image" or cls in seen:
            continue
        seen.add(cls)
        with torch.device("meta"):
            rows.append((cls.__name__, objectives_for(create_model(name, **MODELS.get(name).smoke))))
    return rows


def render() -> str:
    image_objectives = [*MASKED, *(n for n in OBJECTIVES.names() if n not in MASKED)]
    rows = family_rows()
    cols = [o for o in image_objectives if any(o in objs for _, objs in rows)]
    lines = ["| family | " + " | ".join(f"`{c}`" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for family, objs in rows:
        lines.append(f"| {family} | " + " | ".join("yes" if c in objs else "" for c in cols) + " |")
    return "\n".join(lines)


def test_every_image_family_trains_with_a_masked_image_objective():
    """...unless its architecture has no stem grid to mask (`stem_mask` gives the reason: CrossViT)."""
    for family, objs in family_rows():
        cls = next(MODELS.get(n).builds for n in list_models() if MODELS.get(n).builds.__name__ == family)
        if isinstance(getattr(cls, "stem_mask", None), str):
            assert not set(objs) & set(MASKED) and "classify" in objs, family
            continue
        assert set(objs) & set(MASKED), family


def test_readme_table_is_the_registry():
    table = render()
    assert table in (ROOT / "README.md").read_text(), "README's family x objective table is stale:\n" + table
