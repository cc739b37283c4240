"""Dataset registry and raw readers: where the pixels and the text come from before they become MDS shards.

A dataset is a registered `Source` that declares its modality and the fields of its samples (`fields`): image
sources yield `{"image": PIL.Image, "label": int}`, text sources `{"text": str}` plus `"label"` where they have
one. How each field is stored in the shards and decoded back is `pretrain.data.fields`. Nothing is read until
`samples()` is called. Image sources live here; text sources in `pretrain.data.text_sources`.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models.registry import Registry

Sample = dict[str, Any]  # {"image": PIL.Image (mode L or RGB), "label": int} or {"text": str, ["label": int]}


class SourceError(ValueError):
    """Raw input missing or unreadable; the message names the file and what to do."""


class Source:
    """Describes one dataset. Subclass (ImageSource, TextSource), set the attributes, implement `samples`,
    decorate with register_dataset."""

    name: str = ""
    modality: str = "image"  # "image" | "text": which loader path and which config keys apply
    fields: tuple[str, ...] = ("image", "label")  # what every sample holds (pretrain.data.fields)
    splits: tuple[str, ...] | None = None  # None = any split name (the source decides)
    needs_source: bool = False
    description: str = ""  # one line for `python -m pretrain.data list`

    def samples(
        self, split: str, source: str | None = None, max_samples: int | None = None
    ) -> Iterator[Sample]:
        raise NotImplementedError

    def count(self, split: str, source: str | None = None) -> int | None:
        """Samples available in the split without converting it, when cheap to know."""
        return None

    def class_names(self, split: str, source: str | None = None) -> list[str] | None:
        return None


class ImageSource(Source):
    """An image dataset: channels, default normalization, native size; samples {"image": PIL, "label": int}."""

    modality = "image"
    fields = ("image", "label")
    channels: int = 1  # 1 = gray (mode "L"), 3 = RGB
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    image_size: int | None = None  # native side; None = varies per image


# One instance per dataset: every get_dataset(name) returns the same object.
DATASETS = Registry("dataset")


def register_dataset(name: str) -> Callable[[type[Source]], type[Source]]:
    """Class decorator: register an instance of a Source under `name`; a duplicate name raises."""

    def wrap(cls: type[Source]) -> type[Source]:
        DATASETS.register(name)(cls())  # raises ValueError on a duplicate, before cls is touched
        cls.name = name
        return cls

    return wrap


def get_dataset(name: str) -> Source:
    """The registered source; an unknown name raises KeyError listing the registered ones and the nearest."""
    return DATASETS.get(name)


def list_datasets() -> list[str]:
    return DATASETS.names()


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _idx_path(folder: str, split: str, kind: str) -> str:
    prefix = "train" if split == "train" else "t10k"
    name = f"{prefix}-{kind}-ubyte.gz"
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise SourceError(
            f"{path} not found: install Fashion-MNIST with `apt-get install dataset-fashion-mnist`, "
            f"point `source` at a folder holding {name}, or use dataset 'digits'"
        )
    return path


def _idx_header(f: Any, magic: int, ndim: int, path: str) -> list[int]:
    """IDX header: 4-byte big-endian magic, then one 4-byte big-endian size per dimension."""
    head = f.read(4 + 4 * ndim)
    values = [int.from_bytes(head[i : i + 4], "big") for i in range(0, len(head), 4)]
    if len(head) != 4 + 4 * ndim or values[0] != magic:
        raise SourceError(f"{path}: not an IDX file (magic {values[:1]}, expected {magic})")
    return values[1:]


@register_dataset("fashion_mnist")
class FashionMNIST(ImageSource):
    description = "Fashion-MNIST 28x28 gray, 10 classes (Debian dataset-fashion-mnist)"
    channels = 1
    mean = (0.2860,)
    std = (0.3530,)
    image_size = 28
    splits = ("train", "test")
    CLASSES = (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )

    def class_names(self, split: str, source: str | None = None) -> list[str]:
        return list(self.CLASSES)

    def count(self, split: str, source: str | None = None) -> int:
        path = _idx_path(source or FASHION_MNIST_DIR, split, "labels-idx1")
        with gzip.open(path, "rb") as f:
            return _idx_header(f, 2049, 1, path)[0]

    def samples(
        self, split: str, source: str | None = None, max_samples: int | None = None
    ) -> Iterator[Sample]:
        folder = source or FASHION_MNIST_DIR
        img_path = _idx_path(folder, split, "images-idx3")
        lab_path = _idx_path(folder, split, "labels-idx1")
        with gzip.open(img_path, "rb") as fi, gzip.open(lab_path, "rb") as fl:
            n, h, w = _idx_header(fi, 2051, 3, img_path)  # images: 16-byte header
            (n_labels,) = _idx_header(fl, 2049, 1, lab_path)  # labels: 8-byte header
            if n != n_labels:
                raise SourceError(f"{img_path} has {n} images but {lab_path} has {n_labels} labels")
            for _ in range(n if max_samples is None else min(n, max_samples)):
                pixels = np.frombuffer(fi.read(h * w), dtype=np.uint8).reshape(h, w)  # (28, 28)
                yield {"image": Image.fromarray(pixels), "label": fl.read(1)[0]}


# ---------------------------------------------------------------------------------------------- digits


@register_dataset("digits")
class Digits(ImageSource):
    """scikit-learn's 1,797 8x8 digits: always installed, so tests never skip. Fixed split: seed-0 permutation,
    the first 1,437 train and the other 360 test, each kept in original order."""

    description = "scikit-learn's 1,797 8x8 digits, 10 classes (always installed)"
    channels = 1
    mean = (0.3053,)
    std = (0.3759,)
    image_size = 8
    splits = ("train", "test")
    num_train = 1437

    def _indices(self, split: str) -> np.ndarray:
        perm = np.random.default_rng(0).permutation(1797)
        return np.sort(perm[: self.num_train] if split == "train" else perm[self.num_train :])

    def class_names(self, split: str, source: str | None = None) -> list[str]:
        return [str(d) for d in range(10)]

    def count(self, split: str, source: str | None = None) -> int:
        return len(self._indices(split))

    def samples(
        self, split: str, source: str | None = None, max_samples: int | None = None
    ) -> Iterator[Sample]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
        for i in self._indices(split)[:max_samples]:
            yield {"image": Image.fromarray(pixels[i]), "label": int(digits.target[i])}


# ---------------------------------------------------------------------------------------------- image folder


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@register_dataset("image_folder")
class ImageFolder(ImageSource):
    """Any folder of images, walked recursively in sorted order and converted to RGB. Label = index of the
    immediate subfolder among the sorted subfolder names (all 0 when the folder is flat). `source` is the folder
    for the split being converted; the split name is only a label."""

    description = "any folder of images, class = subfolder"
    channels = 3
    mean = (0.485, 0.456, 0.406)  # ImageNet statistics: a sane default for photos
    std = (0.229, 0.224, 0.225)
    needs_source = True

    def _root(self, source: str | None) -> Path:
        if not source or not os.path.isdir(source):
            raise SourceError(f"image_folder needs `source` = an existing folder of images, got {source!r}")
        return Path(source)

    def _files(self, root: Path) -> list[Path]:
        return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    def class_names(self, split: str, source: str | None = None) -> list[str]:
        root = self._root(source)
        return sorted({p.relative_to(root).parts[0] for p in self._files(root) if p.parent != root})

    def count(self, split: str, source: str | None = None) -> int:
        return len(self._files(self._root(source)))

    def samples(
        self, split: str, source: str | None = None, max_samples: int | None = None
    ) -> Iterator[Sample]:
        root = self._root(source)
        files = self._files(root)
        if not files:
            raise SourceError(f"{root}: no images with extensions {IMAGE_EXTENSIONS}")
        classes = {name: i for i, name in enumerate(self.class_names(split, source))}
        for path in files[:max_samples]:
            if classes and path.parent == root:
                raise SourceError(
                    f"{path}: image at the top level of a folder with class subfolders {list(classes)}"
                )
            try:
                with Image.open(path) as img:
                    image = img.convert("RGB")  # decodes fully, so a broken file fails here
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                raise SourceError(f"{path}: cannot decode image ({err})") from err
            label = classes[path.relative_to(root).parts[0]] if classes else 0
            yield {"image": image, "label": label}


# The text and image-text sources register themselves on import; imported last, as they subclass what is
# defined above.
from pretrain.data import image_text as _image_text  # noqa: E402, F401
from pretrain.data import text_sources as _text_sources  # noqa: E402, F401
