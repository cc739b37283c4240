"""Image-text pairs in the data layer: the emoji dataset and its base-name split, caption folders, `datasets` tables,
conversion, the loader's batches (truncation, padding, exact resume), load_pairs, bad input, and the CLIP BPE
tokenizer checked against ids derived independently of it.

Needs what scripts/setup.sh installs: Debian fonts-noto-color-emoji + unicode-data and the CLIP BPE folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.config import ConfigError
from pretrain.data import (
    DataConfig,
    ShardError,
    SourceError,
    build_train_loader,
    clip_bpe,
    convert,
    emoji_entries,
    emoji_split,
    ensure_shards,
    get_dataset,
    import_streaming,
    load_pairs,
    read_meta,
    tokenize_captions,
    tokenizer_info,
)
from pretrain.data.__main__ import main as cli_main
from pretrain.data.fields import fit_caption
from pretrain.data.image_text import EMOJI_FONT, EMOJI_TEST, render_emoji
from pretrain.data.transforms import ImageTransform
from pretrain.dist import DistContext

BOS, EOS = 49406, 49407  # <|startoftext|>, <|endoftext|> in CLIP's vocabulary (also EOS = padding)


def _clip() -> object:
    return tokenizer_info(DataConfig(dataset="emoji"))


def _emoji_cfg(tmp_path: Path, **kw) -> DataConfig:
    base = dict(dataset="emoji", split="test", max_samples=48, image_size=16, num_workers=0, text_len=6)
    base.update(kw)
    base.setdefault("local", str(tmp_path / "emoji"))
    return DataConfig(**base)


@pytest.fixture(scope="module")
def emoji_shards(tmp_path_factory) -> str:
    """The first 48 pairs of the emoji test split, converted once for this module."""
    out = tmp_path_factory.mktemp("pairs") / "emoji_test48"
    convert("emoji", "test", str(out), max_samples=48, data=DataConfig(dataset="emoji", split="test"))
    return str(out)


# ---------------------------------------------------------------------------------------------- emoji


def test_emoji_split_by_base_name_and_counts():
    entries = emoji_entries()
    lines = Path(EMOJI_TEST).read_text(encoding="utf-8").splitlines()
    fully = [ln for ln in lines if not ln.startswith("#") and "; fully-qualified" in ln]
    assert len(entries) == len(fully) > 3000
    # the rule, computed here: test when the CRC-32 of the UTF-8 name before ':' is a multiple of 5
    for name in ("grinning face", "thumbs up: medium skin tone", "flag: Brazil", "red apple"):
        base = name.split(":")[0].encode("utf-8")
        assert emoji_split(name) == ("test" if zlib.crc32(base) % 5 == 0 else "train")
    assert emoji_split("thumbs up") == emoji_split("thumbs up: dark skin tone")
    splits: dict[str, set[str]] = {"train": set(), "test": set()}
    for e in entries:
        splits[emoji_split(e.name)].add(e.name.split(":")[0])
    assert splits["train"] and splits["test"] and not splits["train"] & splits["test"]
    emoji = get_dataset("emoji")
    counts = {s: emoji.count(s) for s in ("train", "test")}
    print(f"emoji pairs per split: {counts} (of {len(entries)} fully-qualified)")
    assert counts["train"] + counts["test"] <= len(entries)
    assert counts["test"] == len([e for e in emoji.entries("test") if render_emoji_ok(e.text)])
    assert 0.1 < counts["test"] / (counts["train"] + counts["test"]) < 0.3
    groups = list(dict.fromkeys(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("# group:")))
    classes = [g for g in groups if g != "Component"]  # Component holds no fully-qualified emoji
    assert emoji.class_names("train") == emoji.class_names("test") == classes


def render_emoji_ok(text: str) -> bool:
    from PIL import ImageFont

    return render_emoji(ImageFont.truetype(EMOJI_FONT, 109), text) is not None


def test_emoji_render_and_unrenderable_sequences_are_counted(tmp_path):
    from PIL import ImageFont

    font = ImageFont.truetype(EMOJI_FONT, 109)
    img = render_emoji(font, "\U0001f600")
    assert img.mode == "RGB" and img.size == (64, 64)
    px = np.asarray(img)
    assert (px[0, 0] == 255).all() and px.std() > 20  # white background, a colored glyph on it
    assert render_emoji(font, "\U0001f600\U0001f600") is None  # two glyphs side by side
    # A source folder whose list holds one sequence the font draws as two glyphs: left out and counted.
    src = tmp_path / "src"
    src.mkdir()
    (src / "NotoColorEmoji.ttf").symlink_to(EMOJI_FONT)
    lines = ["# group: Smileys & Emotion", "1F600 ; fully-qualified # \U0001f600 E1.0 grinning face"]
    lines += ["1F600 1F600 ; fully-qualified # \U0001f600\U0001f600 E1.0 double grin"]
    lines += ["1F603 ; fully-qualified # \U0001f603 E0.6 grinning face with big eyes"]
    (src / "emoji-test.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert {emoji_split("grinning face"), emoji_split("grinning face with big eyes")} == {"train", "test"}
    metas = {}
    for split in ("train", "test"):  # each split gets one of the two drawable emoji, one of them the pair too
        data = DataConfig(dataset="emoji", split=split)
        metas[split] = convert("emoji", split, str(tmp_path / split), source=str(src), data=data)
    assert sum(m["excluded"].get("unrenderable", 0) for m in metas.values()) == 1
    assert sum(m["count"] for m in metas.values()) == 2
    assert all(m["classes"] == ["Smileys & Emotion"] for m in metas.values())


# ---------------------------------------------------------------------------------------------- loader


def _expected_rows(captions: list[str], text_len: int) -> tuple[torch.Tensor, int]:
    """The CLIP ids the loader must give, from tokenizers directly: [BOS] ids [EOS], cut keeping EOS, EOS-padded."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(clip_bpe.CLIP_BPE_DIR / "tokenizer.json"))
    rows, longer = [], 0
    for c in captions:
        ids = [BOS] + tok.encode(c, add_special_tokens=False).ids + [EOS]
        longer += len(ids) > text_len
        ids = ids[: text_len - 1] + [EOS] if len(ids) > text_len else ids + [EOS] * (text_len - len(ids))
        rows.append(ids)
    return torch.tensor(rows), longer


def test_loader_batch_keys_truncation_and_tokenize_captions(emoji_shards, tmp_path, caplog):
    cfg = _emoji_cfg(tmp_path, local=emoji_shards)
    reader = import_streaming().LocalDataset(emoji_shards)
    captions = [reader[i]["caption"] for i in range(len(reader))]
    expected, longer = _expected_rows(captions, cfg.text_len)
    assert 0 < longer < len(captions)  # text_len=6 cuts some emoji names, not all
    with caplog.at_level(logging.INFO, logger="tessera.data"):
        with build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=0) as loader:
            batch = next(loader)
            assert loader.truncated_captions == longer
    assert f"{longer} of 48 captions are longer than data.text_len=6 and are truncated" in caplog.text
    assert set(batch) == {"image", "input_ids", "attention_mask", "index", "epoch", "label"}
    assert batch["image"].shape == (8, 3, 16, 16) and batch["image"].dtype == torch.float32
    for key in ("input_ids", "attention_mask"):
        assert batch[key].shape == (8, 6) and batch[key].dtype == torch.int64
    for key in ("index", "epoch", "label"):
        assert batch[key].shape == (8,) and batch[key].dtype == torch.int64
    ids, mask, index = batch["input_ids"], batch["attention_mask"], batch["index"]
    assert torch.equal(ids, expected[index])
    lengths = mask.sum(1)
    assert (ids[:, 0] == BOS).all()
    assert (ids[torch.arange(8), lengths - 1] == EOS).all()  # EOS is the last real token, truncated or not
    assert (ids[mask == 0] == EOS).all() and (mask == (torch.arange(6) < lengths[:, None])).all()
    names = get_dataset("emoji").class_names("test")
    groups = {e.name: e.group for e in emoji_entries()}
    assert [names[i] for i in batch["label"]] == [groups[captions[i]] for i in index.tolist()]
    # tokenize_captions gives exactly the loader's rows for the same captions
    got_ids, got_mask, truncated = tokenize_captions([captions[i] for i in index.tolist()], _clip(), 6)
    assert torch.equal(got_ids, ids) and torch.equal(got_mask, mask)
    assert truncated == _expected_rows([captions[i] for i in index.tolist()], 6)[1]


def test_fit_caption_and_tokenize_captions_rules():
    tokens = torch.tensor([BOS, 10, 11, 12, 13, EOS])
    ids, mask = fit_caption(tokens, 4, pad_id=EOS)
    assert ids.tolist() == [BOS, 10, 11, EOS] and mask.tolist() == [1, 1, 1, 1]
    ids, mask = fit_caption(tokens, 8, pad_id=0)
    assert ids.tolist() == [BOS, 10, 11, 12, 13, EOS, 0, 0] and mask.tolist() == [1] * 6 + [0, 0]
    ids, mask = fit_caption(tokens, 6, pad_id=0)
    assert torch.equal(ids, tokens) and mask.tolist() == [1] * 6
    long = "a photo of a very very very very very very very very very very very very long cat " * 6
    got, m, truncated = tokenize_captions(["a photo of a cat", long], _clip(), 77)
    assert got.shape == (2, 77) and truncated == 1 and got[1, -1] == EOS and m[1].all()
    assert m[0].sum() == 7 and (got[0, 7:] == _clip().padding_id).all()
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        tokenize_captions(["a cat", "  "], _clip(), 77)
    with pytest.raises(ConfigError, match="data.text_len"):
        DataConfig(dataset="emoji", text_len=1).validate()


def _take(loader, n: int) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """n batches as (epoch, batch); the epoch is read after the batch arrived."""
    out = []
    for _ in range(n):
        batch = {k: v.clone() for k, v in next(loader).items()}
        out.append((loader.epoch, batch))
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        ea == eb and ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
        for (ea, ba), (eb, bb) in zip(a, b)
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_bit_identical_mid_epoch(emoji_shards, tmp_path, num_workers):
    cfg = _emoji_cfg(tmp_path, local=emoji_shards, num_workers=num_workers)
    seed, total = 5, 9  # 6 batches of 8 per epoch: into the second epoch
    with build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=seed) as loader:
        ref = _take(loader, total)
    assert [e for e, _ in ref] == [0] * 6 + [1] * 3
    first = torch.cat([b["index"] for _, b in ref[:6]])
    assert sorted(first.tolist()) == list(range(48))
    for k in (4, 7):  # mid-epoch, mid-second-epoch
        with build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=seed) as loader:
            head = _take(loader, k)
            state = json.loads(json.dumps(loader.state_dict()))
        assert _same(head, ref[:k])
        with build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=seed) as loader:
            loader.load_state_dict(state)
            tail = _take(loader, total - k)
        assert _same(tail, ref[k:]), f"resume after {k} batches diverged"
    # augmentation is seeded per (seed, epoch, sample): the same pair differs across epochs
    by_epoch = [
        {int(i): x for _, b in ref[e * 6 : e * 6 + 3] for i, x in zip(b["index"], b["image"])} for e in (0, 1)
    ]
    common = set(by_epoch[0]) & set(by_epoch[1])
    assert common and all(not torch.equal(by_epoch[0][i], by_epoch[1][i]) for i in common)


def test_undecodable_pair_in_shards_errors_or_is_skipped(emoji_shards, tmp_path):
    """The image path's bad-sample handling, for pairs: a named ShardError, or a counted skip."""
    shards = tmp_path / "shards"
    shutil.copytree(emoji_shards, shards)
    entry = json.loads((shards / "index.json").read_text())["shards"][0]
    path = shards / entry["raw_data"]["basename"]
    data = bytearray(path.read_bytes())
    signature = b"\x89PNG\r\n\x1a\n"
    at = -1
    for _ in range(6):  # one image per row, in row order: the 6th signature starts row 5's image
        at = data.find(signature, at + 1)
    data[at : at + 8] = bytes(b ^ 0x5A for b in data[at : at + 8])
    path.write_bytes(bytes(data))
    cfg = _emoji_cfg(tmp_path, local=str(shards), shuffle=False)
    with build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=0) as loader:
        with pytest.raises(
            ShardError, match=r"sample 5 \(row 5 of the shard\), column 'image': cannot decode"
        ):
            next(loader)
    cfg.bad_samples = "skip"
    with build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=0) as loader:
        batch = next(loader)
        assert loader.bad_samples == 1 and loader.last_bad_samples == [5]
    assert batch["index"].tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert all(len(batch[k]) == 7 for k in ("image", "input_ids", "attention_mask", "label", "epoch"))


def test_load_pairs_matches_the_loader_without_augmentation(emoji_shards, tmp_path):
    cfg = _emoji_cfg(tmp_path, local=emoji_shards, augment=False, shuffle=False, text_len=8)
    pairs = load_pairs(cfg)
    assert pairs.images.shape == (48, 3, 16, 16) and pairs.input_ids.shape == (48, 8)
    assert pairs.class_names == get_dataset("emoji").class_names("test") and pairs.labels.shape == (48,)
    ids, mask, _ = tokenize_captions(pairs.captions, _clip(), 8)
    assert torch.equal(pairs.input_ids, ids) and torch.equal(pairs.attention_mask, mask)
    with build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=0) as loader:
        batch = next(loader)
    i = batch["index"]
    assert torch.equal(batch["image"], pairs.images[i])
    assert torch.equal(batch["input_ids"], pairs.input_ids[i]) and torch.equal(
        batch["label"], pairs.labels[i]
    )


# ---------------------------------------------------------------------------------------------- folders, tables


def _png(path: Path, color: tuple[int, int, int], size: int = 12) -> Image.Image:
    img = Image.new("RGB", (size, size), color)
    img.putpixel((1, 2), (color[2], color[0], color[1]))
    img.save(path)
    return img


CAPTIONS = ["a red square", "a green square", "a blue square", "a yellow square with a longer caption"]
COLORS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (200, 200, 10)]


@pytest.mark.parametrize("kind", ["jsonl", "tsv"])
def test_caption_folder(tmp_path, kind):
    root = tmp_path / "folder"
    (root / "img").mkdir(parents=True)
    images = [_png(root / "img" / f"{i}.png", c) for i, c in enumerate(COLORS)]
    if kind == "jsonl":
        lines = [json.dumps({"file": f"img/{i}.png", "caption": c}) for i, c in enumerate(CAPTIONS)]
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n\n")
        extra = dict(image_field="file", text_field="caption")
    else:
        (root / "captions.tsv").write_text("".join(f"img/{i}.png\t{c}\n" for i, c in enumerate(CAPTIONS)))
        extra = {}
    cfg = DataConfig(
        dataset="image_captions",
        split="val",
        source=str(root),
        local=str(tmp_path / "s"),
        image_size=12,
        **extra,
    )
    pairs = load_pairs(cfg)
    assert pairs.captions == CAPTIONS and pairs.labels is None and pairs.class_names is None
    info = get_dataset("image_captions")
    t = ImageTransform(12, info.mean, info.std)
    assert all(torch.equal(pairs.images[i], t(img)) for i, img in enumerate(images))
    ids, _, _ = tokenize_captions(CAPTIONS, _clip(), 77)
    assert torch.equal(pairs.input_ids, ids)
    with build_train_loader(cfg, DistContext(), micro_batch_size=2, seed=0) as loader:
        assert set(next(loader)) == {"image", "input_ids", "attention_mask", "index", "epoch"}
    if kind == "jsonl":  # the shards remember which fields they were read from
        with pytest.raises(ShardError, match="image_field"):
            ensure_shards(dataclasses.replace(cfg, image_field="path"), DistContext())
        with pytest.raises(SourceError, match="data.image_field: 'path' is not in .*captions.jsonl:1"):
            data = DataConfig(dataset="image_captions", image_field="path", text_field="caption")
            convert("image_captions", "val", str(tmp_path / "t"), source=str(root), data=data)


def _table(tmp_path: Path, bad_row: bool = False) -> tuple[Path, list[Image.Image]]:
    from pretrain.data.text_sources import import_datasets

    datasets = import_datasets()
    images = [Image.new("RGB", (10, 10), c) for c in COLORS]
    column = [{"bytes": _bytes(img), "path": None} for img in images]
    if bad_row:
        column[2] = {"bytes": b"\x89PNG\r\n\x1a\nnot really", "path": None}
    features = datasets.Features({"picture": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"picture": column, "text": CAPTIONS}, features=features)
    path = tmp_path / "table.parquet"
    ds.to_parquet(str(path))
    return path, images


def _bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_datasets_table(tmp_path):
    path, images = _table(tmp_path)
    cfg = DataConfig(
        dataset="hf_image_text", split="train", source=str(path), local=str(tmp_path / "s"), image_size=10
    )
    with pytest.raises(SourceError, match="data.image_field: 'image' is not a column"):
        load_pairs(cfg)
    cfg.image_field = "picture"
    pairs = load_pairs(cfg)
    info = get_dataset("hf_image_text")
    t = ImageTransform(10, info.mean, info.std)
    assert pairs.captions == CAPTIONS
    assert all(torch.equal(pairs.images[i], t(im)) for i, im in enumerate(images))
    # a save_to_disk folder (a DatasetDict) reads the same, data.split picking the split
    from pretrain.data.text_sources import import_datasets

    datasets = import_datasets()
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "disk"))
    cfg2 = dataclasses.replace(
        cfg, split="validation", source=str(tmp_path / "disk"), local=str(tmp_path / "s2")
    )
    pairs2 = load_pairs(cfg2)
    assert pairs2.captions == CAPTIONS and torch.equal(pairs2.images, pairs.images)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_image_and_empty_caption_error_or_skip(tmp_path):
    root = tmp_path / "folder"
    root.mkdir()
    for i, c in enumerate(COLORS):
        _png(root / f"{i}.png", c)
    (root / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")  # not decodable
    rows = [f"{i}.png\t{c}" for i, c in enumerate(CAPTIONS)] + ["missing.png\ta cat", "3.png\t   "]
    (root / "captions.tsv").write_text("\n".join(rows) + "\n")
    data = DataConfig(dataset="image_captions")
    with pytest.raises(
        SourceError, match=r"captions.tsv:2: image .*1.png does not decode .*bad_samples=skip"
    ):
        convert("image_captions", "x", str(tmp_path / "a"), source=str(root), data=data)
    assert not (tmp_path / "a").exists()
    data.bad_samples = "skip"
    meta = convert("image_captions", "x", str(tmp_path / "b"), source=str(root), data=data)
    assert meta["skipped"] == {"bad_image": 2, "empty_caption": 1} and meta["count"] == 3
    assert read_meta(str(tmp_path / "b"))["skipped"] == meta["skipped"]
    _png(root / "1.png", COLORS[1])  # repaired: now the empty caption is the first bad pair
    (root / "captions.tsv").write_text("\n".join(rows[:4] + ["3.png\t"]) + "\n")
    data.bad_samples = "error"
    with pytest.raises(SourceError, match=r"captions.tsv:5: empty caption"):
        convert("image_captions", "x", str(tmp_path / "c"), source=str(root), data=data)
    (tmp_path / "t").mkdir()
    path, _ = _table(tmp_path / "t", bad_row=True)
    hf = DataConfig(dataset="hf_image_text", image_field="picture")
    with pytest.raises(SourceError, match=r"table.parquet: row 2: image bytes does not decode"):
        convert("hf_image_text", "train", str(tmp_path / "d"), source=str(path), data=hf)


def test_missing_inputs_are_named(tmp_path, monkeypatch):
    with pytest.raises(SourceError, match="image_captions needs data.source = a folder"):
        convert("image_captions", "x", str(tmp_path / "a"), source=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="neither captions.jsonl nor captions.tsv"):
        convert("image_captions", "x", str(tmp_path / "a"), source=str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="apt-get install unicode-data"):
        convert("emoji", "test", str(tmp_path / "a"), source=str(tmp_path / "empty"))
    (tmp_path / "empty" / "emoji-test.txt").symlink_to(EMOJI_TEST)
    with pytest.raises(SourceError, match="apt-get install fonts-noto-color-emoji"):
        convert("emoji", "test", str(tmp_path / "a"), source=str(tmp_path / "empty"))
    monkeypatch.setattr(clip_bpe, "CLIP_BPE_DIR", tmp_path / "no_clip")
    with pytest.raises(
        ConfigError, match=r"^data.tokenizer: the CLIP BPE is not built .*bash scripts/setup.sh"
    ):
        DataConfig(dataset="emoji").validate()


# ---------------------------------------------------------------------------------------------- tokenizers


def test_trained_bpe_for_captions(tmp_path):
    root = tmp_path / "folder"
    root.mkdir()
    for i, c in enumerate(COLORS):
        _png(root / f"{i}.png", c)
    (root / "captions.tsv").write_text("".join(f"{i}.png\t{c}\n" for i, c in enumerate(CAPTIONS)))
    local = str(tmp_path / "shards" / "train")
    cfg = DataConfig(dataset="image_captions", source=str(root), local=local, image_size=12, text_len=8)
    cfg.tokenizer, cfg.vocab_size = "bpe", 300
    pairs = load_pairs(cfg)
    tok = tokenizer_info(cfg)
    assert tok.trained and tok.vocab_size == 300 and Path(tok.path).is_file()
    assert (pairs.input_ids[:, 0] == tok.bos_id).all() and (pairs.input_ids < 300).all()
    assert torch.equal(pairs.input_ids, tokenize_captions(CAPTIONS, tok, 8)[0])


def _hand_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[int]:
    """CLIP ids of one lower-case ASCII word, derived from the merge list alone: symbols are the letters (the last
    with '</w>'), the lowest-ranked adjacent pair is merged until none applies; then a letter's id is its byte
    minus 33 (bytes '!'..'~' open the byte alphabet), +256 with '</w>', and a merged token's id is 512 + its rank."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    by_token = {a + b: r for (a, b), r in ranks.items()}
    ids = []
    for s in symbols:
        if s in by_token:
            ids.append(512 + by_token[s])
        else:
            ids.append(ord(s[0]) - 33 + (256 if s.endswith("</w>") else 0))
    return ids


def test_clip_tokenizer_ids_against_independent_references():
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    folder = clip_bpe.CLIP_BPE_DIR
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    info = _clip()
    assert (info.vocab_size, info.bos_id, info.eos_id, info.padding_id) == (49408, BOS, EOS, EOS)
    # 1. open_clip's documented ids for a photo of a cat
    assert tok.encode("a photo of a cat").ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
    # 2. the slow (pure Python) CLIPTokenizer on the same vocab.json/merges.txt, ASCII strings
    slow = CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
    strings = [
        "grinning face",
        "Thumbs up: medium-dark skin tone",
        "flag: United States",
        "A  photo\tof 2 DOGS!",
    ]
    for s in strings:
        assert tok.encode(s).ids == slow(s)["input_ids"], s
    # 3. by hand from the merge ranks
    lines = (folder / "merges.txt").read_text().splitlines()[1:]
    assert len(lines) == 49152 - 256 - 2
    ranks = {tuple(line.split(" ")): r for r, line in enumerate(lines)}
    for word in ("grinning", "face", "technologist", "zzqx"):
        assert tok.encode(word, add_special_tokens=False).ids == _hand_bpe(word, ranks), word


def test_clip_bpe_build_is_idempotent(tmp_path):
    import gzip

    merges = (clip_bpe.CLIP_BPE_DIR / "merges.txt").read_text().splitlines()[1:]
    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    gz.write_bytes(gzip.compress(("#version header\n" + "\n".join(merges) + "\n").encode()))
    out = tmp_path / "clip"
    assert clip_bpe.main([str(gz), "--out", str(out)]) == 0
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        a, b = (out / name).read_bytes(), (clip_bpe.CLIP_BPE_DIR / name).read_bytes()
        assert a == b, name
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    clip_bpe.build(gz, out)
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp  # same file: nothing rebuilt
    assert clip_bpe.main([str(tmp_path / "clip" / "vocab.json")]) == 2  # neither a wheel nor a gzip


def test_cli_lists_the_pair_datasets(capsys):
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("emoji", "image_captions", "hf_image_text"):
        assert any(line.startswith(name) and "pairs" in line for line in out.splitlines()), name
