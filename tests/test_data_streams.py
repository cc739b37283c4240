"""data.streams: several dataset splits mixed in the one loader (mosaicml-streaming Streams), images and text alike.

Proportions are checked by counting sample ids per stream over an epoch (streaming numbers the samples of stream
i after those of streams 0..i-1); resume with two streams must be bit-identical; a bad stream is named by index.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.config import ConfigError
from pretrain.data import (
    DataConfig,
    ImageTransform,
    ShardError,
    SourceError,
    StreamConfig,
    build_train_loader,
    convert,
    ensure_all_shards,
    get_dataset,
    import_streaming,
    tokenizer_info,
)
from pretrain.dist import DistContext

needs_wordnet = pytest.mark.skipif(
    not Path("/usr/share/wordnet/data.noun").exists(), reason="apt-get install wordnet-base"
)


@pytest.mark.parametrize(
    "streams, message",
    [
        (
            [{}, {"dataset": "wordnet"}],
            r"^data\.streams\[1\]\.dataset: 'wordnet' holds text but data\.dataset",
        ),
        ([{"proportion": 0.5}, {"split": "test"}], r"^data\.streams\[1\]\.proportion: missing"),
        ([{"proportion": 0.5, "repeat": 2.0}], r"^data\.streams\[0\]\.repeat: give proportion or repeat"),
        ([{"repeat": -1.0}], r"^data\.streams\[0\]\.repeat: must be >= 0"),
        (
            [{"local": "x"}, {"split": "test", "local": "x"}],
            r"^data\.streams\[1\]\.local: .* also data\.streams\[0\]",
        ),
        ([{}, {"dataset": "image_folder"}], r"^data\.streams\[1\]\.source: dataset 'image_folder' needs"),
        ([{"split": "val"}], r"^data\.streams\[0\]\.split: 'digits' has splits"),
        ([{"max_samples": 0}], r"^data\.streams\[0\]\.max_samples: must be > 0"),
        ([{"dataset": "nope"}], r"^data\.streams\[0\]\.dataset: unknown dataset 'nope'"),
    ],
)
def test_stream_config_errors_name_the_stream(streams, message):
    DataConfig(dataset="digits", streams=[StreamConfig(), StreamConfig(split="test")]).validate()
    with pytest.raises(ConfigError, match=message):
        DataConfig(dataset="digits", streams=[StreamConfig(**s) for s in streams]).validate()


def test_streams_from_the_config_tree():
    from pretrain.build import from_dict

    tree = {
        "objective": {"name": "mae"},
        "data": {"dataset": "digits", "streams": [{"proportion": 1}, {"split": "test", "proportion": 3}]},
    }
    streams = from_dict(tree).data.streams
    assert streams == [StreamConfig(proportion=1.0), StreamConfig(split="test", proportion=3.0)]
    tree["data"]["streams"][1]["splt"] = "test"
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.streams\[1\]\.splt'"):
        from_dict(tree)


def test_stream_configs_inherit_dataset_and_split_only():
    cfg = DataConfig(
        dataset="digits", source="s", max_samples=9, streams=[StreamConfig(), StreamConfig(split="test")]
    )
    a, b = cfg.stream_configs()
    assert (a.dataset, a.split, b.split) == ("digits", "train", "test")
    assert a.source is b.source is a.max_samples is None and a.streams == []
    assert a.local_dir() != b.local_dir()


# ---------------------------------------------------------------------------------------------- images


def test_image_streams_mix_in_proportion(digits_shards, tmp_path):
    test_dir = str(tmp_path / "test")
    convert("digits", "test", test_dir)
    cfg = DataConfig(
        dataset="digits",
        image_size=8,
        num_workers=0,
        augment=False,
        streams=[
            StreamConfig(local=digits_shards, proportion=0.25),
            StreamConfig(split="test", local=test_dir, proportion=0.75),
        ],
    )
    with build_train_loader(cfg, DistContext(), micro_batch_size=64, seed=0) as loader:
        epoch = [next(loader) for _ in range(loader.batches_per_epoch)]
        assert loader.epoch == 0
    ids = torch.cat([b["index"] for b in epoch])
    from_test = ids >= 1437  # stream 1's samples are numbered after stream 0's 1,437
    assert len(ids) == 1792 and abs(from_test.float().mean().item() - 0.75) < 0.02
    assert len(set(ids[from_test].tolist())) == 360  # the small split is upsampled: every sample, ~3.7 times
    # Sample i of stream 1 is test sample i - 1437: the pixels say so.
    reader = import_streaming().LocalDataset(test_dir)
    info = get_dataset("digits")
    t = ImageTransform(8, info.mean, info.std)
    images = torch.cat([b["image"] for b in epoch])
    for j in torch.nonzero(from_test)[:5, 0].tolist():
        assert torch.equal(images[j], t(reader[int(ids[j]) - 1437]["image"]))


def test_image_streams_of_other_channels_are_refused(digits_shards, tmp_path):
    for k in range(2):
        (tmp_path / "img" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(tmp_path / "img" / "a" / f"{k}.png")
    cfg = DataConfig(
        dataset="digits",
        num_workers=0,
        streams=[
            StreamConfig(local=digits_shards),
            StreamConfig(dataset="image_folder", source=str(tmp_path / "img"), local=str(tmp_path / "f")),
        ],
    )
    with pytest.raises(ConfigError, match=r"^data\.streams\[1\]\.dataset: 'image_folder' has 3 channel"):
        build_train_loader(cfg, DistContext(), micro_batch_size=4, seed=0)
    assert not (tmp_path / "f").exists()  # refused before anything was converted


# ---------------------------------------------------------------------------------------------- text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small .jsonl corpus: 40 documents of a few words."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "tessera", "stream", "token", "row"]
    lines = [json.dumps({"text": " ".join(rng.choice(words, size=rng.integers(3, 30)))}) for _ in range(40)]
    (root / "c.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _text_cfg(tmp_path: Path, corpus: Path, **kw) -> DataConfig:
    base = dict(
        dataset="wordnet",
        vocab_size=300,
        seq_len=64,
        num_workers=0,
        streams=[
            StreamConfig(local=str(tmp_path / "wn"), max_samples=200),
            StreamConfig(dataset="jsonl", source=str(corpus), local=str(tmp_path / "js"), repeat=2.0),
        ],
    )
    return DataConfig(**{**base, **kw})


def _take(loader, k: int) -> list[dict]:
    return [{key: v.clone() for key, v in next(loader).items()} for _ in range(k)]


@needs_wordnet
def test_text_streams_share_the_tokenizer_and_resume_bit_identically(tmp_path, corpus):
    cfg = _text_cfg(tmp_path, corpus)
    ensure_all_shards(cfg, DistContext())
    tok = tokenizer_info(cfg)
    assert tok.path.startswith(str(tmp_path)) and "tokenizer-wordnet-bpe300-first200" in tok.path
    metas = [json.loads((tmp_path / d / "tessera.json").read_text()) for d in ("wn", "js")]
    assert [m["tokenizer"]["sha256"] for m in metas] == [tok.sha256] * 2 and metas[1]["documents"] == 40
    with build_train_loader(cfg, DistContext(), micro_batch_size=4, seed=2) as loader:
        ref = _take(loader, 40)
    ids = torch.cat([b["index"] for b in ref]).tolist()
    from_jsonl = [i for i in ids if i >= 200]
    # One epoch is 200 WordNet documents + 2 x 40 jsonl ones; the first 20 micro-batches are well inside it.
    first = torch.cat([b["index"] for b in ref[:20]]).tolist()
    share = sum(i >= 200 for i in first) / len(first)
    assert 0.15 < share < 0.45 and set(from_jsonl) <= set(range(200, 240))
    for k in (7, 25):
        with build_train_loader(cfg, DistContext(), micro_batch_size=4, seed=2) as loader:
            assert all(torch.equal(a[x], b[x]) for a, b in zip(_take(loader, k), ref) for x in a)
            state = json.loads(json.dumps(loader.state_dict()))
        with build_train_loader(cfg, DistContext(), micro_batch_size=4, seed=2) as loader:
            loader.load_state_dict(state)
            tail = _take(loader, 40 - k)
        assert all(torch.equal(a[x], b[x]) for a, b in zip(tail, ref[k:]) for x in a), f"resume after {k}"


@needs_wordnet
def test_bad_text_stream_is_named(tmp_path, corpus):
    cfg = _text_cfg(tmp_path, corpus)
    ensure_all_shards(cfg, DistContext())
    # Stream 1's shards re-converted with another tokenizer (trained on stream 1 itself): refused, naming both.
    other = DataConfig(
        dataset="jsonl", source=str(corpus), vocab_size=280, local=str(tmp_path / "js2" / "train")
    )
    convert("jsonl", "train", str(tmp_path / "js2" / "train"), source=str(corpus), data=other)
    cfg.streams[1].local = str(tmp_path / "js2" / "train")
    with pytest.raises(ShardError) as err:
        ensure_all_shards(cfg, DistContext())
    message = str(err.value)
    assert message.startswith("data.streams[1] (jsonl/train): ") and "tokenizer-jsonl-bpe280" in message
    assert tokenizer_info(cfg).path in message
    cfg.streams[1] = StreamConfig(
        dataset="text_files", source=str(tmp_path / "nowhere"), local=str(tmp_path / "t")
    )
    with pytest.raises(
        SourceError, match=r"^data\.streams\[1\] \(text_files/train\): .*nowhere: no such file"
    ):
        ensure_all_shards(cfg, DistContext())
