"""What data to train on and how to present it: one dataclass, validated before anything is built."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DataConfig:
    # Registered dataset name (`python -m pretrain.data list`): fashion_mnist, digits, image_folder, ...
    dataset: str = "fashion_mnist"
    # Which split to read; fixed-split datasets check it, image_folder takes any name for `source`.
    split: str = "train"
    # Raw input overriding the dataset's default location; required for image_folder (a folder of images,
    # class = immediate subfolder name, if any).
    source: str | None = None
    # Directory with MDS shards, or their local cache when `remote` is set.
    # None = data/shards/<dataset>/<split> under the working directory (`-first<N>` appended with max_samples).
    local: str | None = None
    # Another directory already holding shards (`python -m pretrain.data convert ... --out REMOTE`),
    # streamed into `local`.
    remote: str | None = None
    # Side of the square images the model sees.
    image_size: int = 28
    # DataLoader worker processes per rank (0 = load in the training process).
    num_workers: int = 2
    # Shuffle every epoch; the shuffle seed is the run seed given to build_train_loader.
    shuffle: bool = True
    # Train-time augmentation: random-resized crop (scale (crop_scale_min, 1)) + horizontal flip.
    augment: bool = True
    # Smallest crop area, as a fraction of the image, for the random-resized crop.
    crop_scale_min: float = 0.35
    # Random horizontal flip (p = 0.5) when augmenting; turn off for digits/text-like images.
    hflip: bool = True
    # Convert only the first N samples of the split (tiny configs, tests); None = all.
    max_samples: int | None = None
    # Per-channel normalization; None = the dataset's defaults.
    mean: list[float] | None = None
    std: list[float] | None = None
    # A sample that does not decode (corrupt image or label bytes inside an intact shard file):
    # "error" stops the run with ShardError naming the shard file, sample id, column and decoder message;
    # "skip" drops it from its micro-batch (which is then smaller), counts it per rank and logs it.
    # A shard file missing, truncated or unfetchable is always an error: skipping would drop a whole shard.
    bad_samples: str = "error"
    # "skip" only: stop with ShardError once more than this many samples have been skipped on one rank since the
    # run began (the count is checkpointed, so resumes add up); 0 = the first bad sample stops the run.
    max_bad_samples: int = 100

    def local_dir(self) -> str:
        """Where the shards (or their cache) live; a max_samples subset never shares the full set's dir."""
        if self.local:
            return self.local
        split = self.split if self.max_samples is None else f"{self.split}-first{self.max_samples}"
        return os.path.join("data", "shards", self.dataset, split)

    def validate(self) -> None:
        """Raise ConfigError whose message starts with the offending key (`data.<field>: ...`), before any
        process forks or converts."""
        from pretrain.data.sources import get_dataset

        try:
            info = get_dataset(self.dataset)
        except KeyError as err:
            raise config_error(f"data.dataset: {err.args[0]}") from None
        if info.needs_source and not self.source:
            raise config_error(f"data.source: dataset {self.dataset!r} needs a source folder of images")
        if info.splits is not None and self.split not in info.splits:
            raise config_error(
                f"data.split: {self.dataset!r} has splits {list(info.splits)}, not {self.split!r}"
            )
        if self.image_size <= 0:
            raise config_error(f"data.image_size: must be > 0, got {self.image_size}")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise config_error(f"data.crop_scale_min: must be in (0, 1], got {self.crop_scale_min}")
        if self.num_workers < 0:
            raise config_error(f"data.num_workers: must be >= 0, got {self.num_workers}")
        if self.bad_samples not in ("error", "skip"):
            raise config_error(f"data.bad_samples: must be 'error' or 'skip', got {self.bad_samples!r}")
        if self.max_bad_samples < 0:
            raise config_error(f"data.max_bad_samples: must be >= 0, got {self.max_bad_samples}")
        if self.max_samples is not None and self.max_samples <= 0:
            raise config_error(f"data.max_samples: must be > 0 or None, got {self.max_samples}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != info.channels:
                raise config_error(
                    f"data.{name}: {self.dataset!r} has {info.channels} channel(s), got {list(value)}"
                )
        if self.std is not None and any(s <= 0 for s in self.std):
            raise config_error(f"data.std: every entry must be > 0, got {list(self.std)}")
        if self.remote and os.path.abspath(self.remote) == os.path.abspath(self.local_dir()):
            raise config_error("data.remote: must differ from data.local (local is the cache streamed into)")


def config_error(message: str) -> ValueError:
    """pretrain.config.ConfigError(message); imported here, not at the top: pretrain.config imports this module."""
    from pretrain.config import ConfigError

    return ConfigError(message)
