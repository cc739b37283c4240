"""Text data: WordNet and local sources, tokenizers, MDS token shards, packing, the one loader resuming exactly.

Shards are tiny (a few hundred WordNet synsets, vocabularies of 300-400 ids) so the file runs in well under a
minute; references are independent of the code under test: the raw WordNet lines, the tokenizers library
itself, the shards read back with streaming's LocalDataset, a naive token-by-token packing check.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config import ConfigError
from pretrain.data import (
    DataConfig,
    Packer,
    ShardError,
    SourceError,
    build_train_loader,
    convert,
    ensure_shards,
    ensure_tokenizer,
    get_dataset,
    hf_tokenizer,
    import_streaming,
    load_token_split,
    read_meta,
    token_counts,
    tokenizer_info,
)
from pretrain.data.__main__ import main as cli_main
from pretrain.data.packing import redistribute
from pretrain.data.text_sources import LEXNAMES, wordnet_split
from pretrain.data.tokenizer import load_tokenizer
from pretrain.dist import DistContext

WORDNET = Path("/usr/share/wordnet")
needs_wordnet = pytest.mark.skipif(
    not (WORDNET / "data.noun").exists(), reason="apt-get install wordnet-base"
)


@pytest.fixture(scope="module")
def wn(tmp_path_factory) -> DataConfig:
    """The first 300 WordNet train synsets as token shards, with a trained 300-id BPE next to them."""
    root = tmp_path_factory.mktemp("wn")
    cfg = DataConfig(
        dataset="wordnet",
        local=str(root / "train"),
        max_samples=300,
        vocab_size=300,
        seq_len=128,
        num_workers=0,
    )
    ensure_shards(cfg, DistContext())
    return cfg


def _shard_docs(local: str) -> list[list[int]]:
    reader = import_streaming().LocalDataset(local)
    return [np.asarray(reader[i]["tokens"]).tolist() for i in range(len(reader))]


def _pieces(batch: dict) -> list[tuple[int, list[int]]]:
    """(sample id, tokens) of every piece of a packed micro-batch, in row order, from the rows themselves."""
    out, k = [], 0
    for r in range(batch["input_ids"].shape[0]):
        doc_ids = batch["doc_ids"][r]
        for d in range(int(doc_ids.max()) + 1):
            out.append((int(batch["index"][k]), batch["input_ids"][r][doc_ids == d].tolist()))
            k += 1
    assert k == len(batch["index"])
    return out


def _check_rows(batch: dict, seq_len: int, pad_id: int) -> None:
    """Rows exactly seq_len; positions +1 or reset to 0 exactly where the doc id steps by one; padding (doc id -1,
    position 0, pad id) only at the end of a row."""
    ids, pos, doc = batch["input_ids"], batch["positions"], batch["doc_ids"]
    assert ids.shape[1] == pos.shape[1] == doc.shape[1] == seq_len and ids.dtype == torch.int64
    for r in range(ids.shape[0]):
        real = doc[r] >= 0
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any(), "padding only at the end of a row"
        assert (ids[r][n:] == pad_id).all() and (pos[r][n:] == 0).all()
        assert pos[r][0] == 0 and doc[r][0] == 0
        for t in range(1, n):
            if pos[r][t] == 0:
                assert doc[r][t] == doc[r][t - 1] + 1
            else:
                assert pos[r][t] == pos[r][t - 1] + 1 and doc[r][t] == doc[r][t - 1]


# ---------------------------------------------------------------------------------------------- WordNet


@needs_wordnet
def test_wordnet_split_rule_documents_and_labels():
    wn = get_dataset("wordnet")
    synsets = list(wn.synsets())
    assert len(synsets) == 117659 and len({(pos, off) for pos, off, *_ in synsets}) == len(synsets)
    test = [s for s in synsets if wordnet_split(s[1]) == "test"]
    assert all(off % 10 == 0 for _, off, *_ in test) and 0.09 < len(test) / len(synsets) < 0.11
    assert wn.count("test") == len(test) and wn.count("train") == len(synsets) - len(test)
    # A lexicographer file belongs to its part of speech (noun.* only in data.noun, ...): labels are the real ids.
    prefix = {"noun": "noun.", "verb": "verb.", "adj": "adj.", "adv": "adv."}
    assert all(LEXNAMES[lex].startswith(prefix[pos]) for pos, _, lex, _, _ in synsets)
    assert len({lex for _, _, lex, _, _ in synsets}) == 45 == len(wn.class_names("train"))
    # Offset 1740 is both a noun ("entity") and an adjective ("able"): each line decides by its own offset.
    first_test = list(wn.samples("test", max_samples=1))[0]
    assert first_test == {
        "text": "entity: that which is perceived or known or inferred to have its own distinct existence "
        "(living or nonliving)",
        "label": LEXNAMES.index("noun.Tops"),
    }
    texts = {d["text"] for d in wn.samples("train")}
    assert 'abounding, galore: existing in abundance; "abounding confidence"; "whiskey galore"' in texts
    assert "able: (usually followed by `to') having the necessary means" not in " ".join(
        texts
    )  # 1740 is test


def test_wordnet_missing_package_message(tmp_path):
    with pytest.raises(SourceError, match="apt-get install wordnet-base"):
        next(get_dataset("wordnet").samples("train", source=str(tmp_path)))


# ---------------------------------------------------------------------------------------------- tokenizers


@needs_wordnet
def test_trained_tokenizer_info_deterministic_and_shared(wn, tmp_path):
    info = tokenizer_info(wn)
    assert info.sha256 is not None and info.trained and info.vocab_size == 300
    assert (info.pad_id, info.bos_id, info.eos_id, info.unk_id, info.mask_id) == (0, 1, 2, 3, 4)
    # Every split converted next to the train shards shares it.
    test_cfg = DataConfig(**{**wn.__dict__, "split": "test", "local": str(Path(wn.local).parent / "test")})
    assert tokenizer_info(test_cfg) == info
    # Cheap before training: the config alone says vocab size and special ids, no file is written.
    other = DataConfig(
        dataset="wordnet", local=str(tmp_path / "a" / "train"), max_samples=300, vocab_size=300
    )
    before = tokenizer_info(other)
    assert before.sha256 is None and not os.path.exists(before.path) and before.vocab_size == 300
    assert before.special_ids == info.special_ids
    # Trained again elsewhere from the same data: the same bytes; reused, not retrained, afterwards.
    again = ensure_tokenizer(other)
    assert again.sha256 == info.sha256 and Path(again.path).read_bytes() == Path(info.path).read_bytes()
    stamp = os.stat(again.path).st_mtime_ns
    assert ensure_tokenizer(other) == again and os.stat(again.path).st_mtime_ns == stamp


@needs_wordnet
def test_hf_tokenizer_round_trip(wn, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = tokenizer_info(wn)
    hf_tokenizer(info).save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    raw = load_tokenizer(info.path)
    texts = ["entity: that which is perceived", "  Ünïcode — and\ttabs\n", 'x "quoted"; y']
    for text in texts:
        ids = raw.encode(text, add_special_tokens=False).ids
        assert loaded(text)["input_ids"] == ids and loaded.decode(ids) == text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.mask_token_id) == (
        0,
        1,
        2,
        4,
    )
    assert loaded.unk_token == "<unk>" and len(loaded) <= info.vocab_size


def _wordpiece(folder: Path, specials: list[str]) -> str:
    """A small WordPiece tokenizer folder (BERT spellings), like a packaged MiniLM tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(specials + list("abcdefghijklmnopqrstuvwxyz") + ["##s", "the"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_padding(length=16)  # like all-MiniLM's file: Tessera must turn it off
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return str(folder)


def test_local_tokenizer_roles_and_missing_ones(tmp_path):
    folder = _wordpiece(tmp_path / "bert", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    info = tokenizer_info(DataConfig(dataset="text_files", source=str(tmp_path), tokenizer=folder))
    assert (info.pad_id, info.unk_id, info.bos_id, info.eos_id, info.mask_id) == (0, 1, 2, 3, 4)
    assert info.vocab_size == 33 and not info.trained and info.path.endswith("tokenizer.json")
    assert load_tokenizer(folder).encode("the the").ids == [32, 32]  # padding to 16 turned off
    bare = _wordpiece(tmp_path / "bare", ["[UNK]", "[SEP]"])
    info = tokenizer_info(DataConfig(dataset="text_files", source=str(tmp_path), tokenizer=bare))
    assert info.mask_id is None and info.pad_id is None and info.eos_id == 1
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: .*bare/tokenizer\.json has no mask token"):
        info.require(["mask"], "objective mlm")
    assert info.padding_id == 1  # packing pads with EOS when there is no pad token
    assert tokenizer_info(DataConfig(dataset="digits")) is None


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"seq_len": 0}, "seq_len"),
        ({"tokenizer": "/no/such/tokenizer.json"}, "tokenizer"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"text_field": ""}, "text_field"),
        ({"split_by": "sentence"}, "split_by"),
        ({"docs_per_fetch": 0}, "docs_per_fetch"),
        ({"split": "validation"}, "split"),
        ({"dataset": "jsonl"}, "source"),
    ],
)
def test_text_config_keys_named(kwargs, key):
    DataConfig(dataset="wordnet").validate()
    with pytest.raises(ConfigError, match=rf"^data\.{key}:"):
        DataConfig(**{"dataset": "wordnet", **kwargs}).validate()


# ---------------------------------------------------------------------------------------------- token shards


@needs_wordnet
def test_token_shards_hold_the_tokenized_documents(wn):
    meta = read_meta(wn.local)
    info = tokenizer_info(wn)
    assert meta["modality"] == "text" and meta["documents"] == meta["count"] == 300
    assert meta["tokenizer"] == {"path": info.path, "sha256": info.sha256, "trained": True}
    assert meta["token_dtype"] == "uint16" and meta["vocab_size"] == 300 and meta["num_classes"] == 45
    reader = import_streaming().LocalDataset(wn.local)
    raw = load_tokenizer(info.path)
    docs = list(get_dataset("wordnet").samples("train", max_samples=300))
    assert sum(len(d) for d in _shard_docs(wn.local)) == meta["tokens"]
    for i in (0, 150, 299):
        tokens = reader[i]["tokens"]
        assert tokens.dtype == np.uint16 and reader[i]["label"] == docs[i]["label"]
        assert tokens.tolist() == raw.encode(docs[i]["text"], add_special_tokens=False).ids + [info.eos_id]
        assert raw.decode(tokens.tolist()[:-1]) == docs[i]["text"]


@needs_wordnet
def test_shards_of_another_tokenizer_are_refused_naming_both(wn, tmp_path):
    other = _wordpiece(tmp_path / "other", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    cfg = DataConfig(**{**wn.__dict__, "tokenizer": other})
    with pytest.raises(ShardError) as err:
        ensure_shards(cfg, DistContext())
    mine, theirs = tokenizer_info(cfg), tokenizer_info(wn)
    assert theirs.path in str(err.value) and mine.path in str(err.value) and "tessera.json" in str(err.value)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_text_files_bad_utf8_named_or_skipped_and_empty_counted(tmp_path):
    src = tmp_path / "src"
    _write(src / "a.txt", "première ligne\n\nsecond paragraph\n".encode())
    _write(src / "b.txt", b"  \n")  # an empty document
    bad = _write(src / "c.txt", b"good start " + b"\xff\xfe" + b" end")
    tok = _wordpiece(tmp_path / "tok", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    cfg = DataConfig(dataset="text_files", source=str(src), tokenizer=tok)
    with pytest.raises(SourceError, match=rf"{bad}: not UTF-8 at byte offset 11 .*data\.bad_samples=skip"):
        convert("text_files", "train", str(tmp_path / "s1"), source=str(src), data=cfg)
    assert not (tmp_path / "s1").exists()
    skip = DataConfig(**{**cfg.__dict__, "bad_samples": "skip", "split_by": "paragraph"})
    meta = convert("text_files", "train", str(tmp_path / "s2"), source=str(src), data=skip)
    assert meta["documents"] == 2 and meta["skipped"] == {"empty": 1, "not_utf8": 1}
    assert read_meta(str(tmp_path / "s2"))["skipped"] == meta["skipped"]
    lines = DataConfig(**{**cfg.__dict__, "bad_samples": "skip", "split_by": "line"})
    meta = convert("text_files", "train", str(tmp_path / "s3"), source=str(src), data=lines)
    assert meta["documents"] == 2 and meta["skipped"] == {"empty": 2, "not_utf8": 1}  # blank line + b.txt
    with pytest.raises(SourceError, match="nowhere: no such file or folder"):
        convert("text_files", "train", str(tmp_path / "s4"), source=str(tmp_path / "nowhere"), data=cfg)


def test_jsonl_field_bad_lines_and_missing_field(tmp_path):
    src = _write(tmp_path / "d.jsonl", b'{"body": "one doc"}\n\n{"body": "two"}\n{not json\n{"body": ""}\n')
    tok = _wordpiece(tmp_path / "tok", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    cfg = DataConfig(dataset="jsonl", source=str(src), tokenizer=tok, text_field="body", bad_samples="skip")
    meta = convert("jsonl", "train", str(tmp_path / "s"), source=str(src), data=cfg)
    assert meta["documents"] == 2 and meta["skipped"] == {"empty": 1, "bad_json": 1}
    with pytest.raises(SourceError, match=r"^data\.text_field: 'text' is not in .*d\.jsonl:1"):
        convert(
            "jsonl",
            "train",
            str(tmp_path / "t"),
            source=str(src),
            data=DataConfig(**{**cfg.__dict__, "text_field": "text"}),
        )


@needs_wordnet
def test_datasets_sources_convert_offline(tmp_path, wn):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pretrain.data.text_sources import import_datasets

    datasets = import_datasets()
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    texts = ["a first document", "héllo wörld", 'the third; with "quotes"']
    _write(tmp_path / "j" / "x.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    _write(tmp_path / "t" / "x.txt", "\n\n".join(texts).encode())
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"text": texts, "n": [1, 2, 3]}), tmp_path / "p" / "x.parquet")
    split = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[::-1]})})
    split.save_to_disk(str(tmp_path / "d"))
    info = tokenizer_info(wn)
    raw = load_tokenizer(info.path)
    for name, folder, order in (
        ("hf_json", "j", texts),
        ("hf_text", "t", texts),
        ("hf_parquet", "p", texts),
        ("hf_disk", "d", texts[::-1]),
    ):
        cfg = DataConfig(
            dataset=name, source=str(tmp_path / folder), tokenizer=info.path, split_by="paragraph"
        )
        out = str(tmp_path / f"shards_{name}")
        meta = convert(name, "train", out, source=cfg.source, data=cfg)
        assert meta["documents"] == 3 and meta["tokenizer"]["sha256"] == info.sha256
        assert [raw.decode(d[:-1]) for d in _shard_docs(out)] == order, name
    with pytest.raises(SourceError, match=r"has splits \['train'\], not 'test'"):
        convert("hf_disk", "test", str(tmp_path / "x"), source=str(tmp_path / "d"), data=cfg)
    with pytest.raises(SourceError, match=r"^data\.text_field: 'body' is not a column"):
        bad = DataConfig(
            dataset="hf_parquet", source=str(tmp_path / "p"), tokenizer=info.path, text_field="body"
        )
        convert("hf_parquet", "train", str(tmp_path / "y"), source=bad.source, data=bad)


# ---------------------------------------------------------------------------------------------- packing


def _random_docs(n: int, seed: int, longest: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (n,), generator=g)
    return [torch.randint(5, 1000, (int(k),), generator=g) for k in lengths]


def _row_pieces(batch: dict) -> list[list[tuple[int, list[int]]]]:
    """Per row, its pieces as (sample id, tokens)."""
    rows, k = [], 0
    for r in range(batch["input_ids"].shape[0]):
        doc_ids, row = batch["doc_ids"][r], []
        for d in range(int(doc_ids.max()) + 1):
            row.append((int(batch["index"][k]), batch["input_ids"][r][doc_ids == d].tolist()))
            k += 1
        rows.append(row)
    return rows


def test_packer_rule_invariants_and_no_token_lost():
    n, docs = 32, _random_docs(200, 0, 100)  # many documents longer than a row
    packer = Packer(n, pad_id=0)
    rows: list[list[tuple[int, list[int]]]] = []
    for i, d in enumerate(docs):
        packer.add(i, d)
        while packer.can_emit(3):
            batch = packer.emit(3)
            _check_rows(batch, n, 0)
            assert batch["input_ids"].shape[0] == 3
            rows += _row_pieces(batch)
    while (batch := packer.emit(3, final=True)) is not None:
        _check_rows(batch, n, 0)
        rows += _row_pieces(batch)
    # Token by token: pieces come in stream order; a row is padded only when the next document (or what is left
    # of it) does not fit the rest; a piece is cut short only when what is left of its document exceeds a row.
    done = [0] * len(docs)  # tokens of each document emitted so far
    cuts = 0
    for r, row in enumerate(rows):
        used = sum(len(t) for _, t in row)
        for j, (sid, toks) in enumerate(row):
            assert toks == docs[sid][done[sid] : done[sid] + len(toks)].tolist()
            assert done[sid] == 0 or j == 0, "a continued document starts its row"
            done[sid] += len(toks)
            if done[sid] < len(docs[sid]):
                cuts += 1
                assert len(docs[sid]) - (done[sid] - len(toks)) > n and used == n
        if r + 1 < len(rows) and used < n:
            nxt = rows[r + 1][0][0]
            assert len(docs[nxt]) - done[nxt] > n - used
    assert done == [len(d) for d in docs], "every token of every document, exactly once"
    assert [sid for row in rows for sid, _ in row] == sorted(sid for row in rows for sid, _ in row)
    assert packer.splits == cuts > 0
    assert all(
        sum(1 for row in rows for s, _ in row if s == i) == 1 for i, d in enumerate(docs) if len(d) <= n
    )
    real = sum(len(d) for d in docs)
    assert (
        packer.real_tokens == real
        and packer.row_tokens == len(rows) * n
        and packer.efficiency == real / (len(rows) * n)
    )


def test_redistribute_loses_and_repeats_nothing():
    ranks = [
        {"pending": [[1, 0], [2, 5], [3, 0]], "real_tokens": 10, "row_tokens": 16, "splits": 1},
        {"pending": [[7, 3]], "real_tokens": 12, "row_tokens": 16, "splits": 0},
    ]
    one = redistribute(ranks, 1)
    assert one[0]["pending"] == [[1, 0], [2, 5], [3, 0], [7, 3]] and one[0]["row_tokens"] == 32
    three = redistribute(one, 3)
    assert sorted(p for r in three for p in r["pending"]) == sorted(one[0]["pending"])
    assert [len(r["pending"]) for r in three] == [2, 1, 1] and redistribute(one, 3) == three


# ---------------------------------------------------------------------------------------------- the loader


def _take(loader, k: int) -> list[tuple[int, dict]]:
    return [(loader.epoch, {key: v.clone() for key, v in next(loader).items()}) for _ in range(k)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        ea == eb and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for (ea, x), (eb, y) in zip(a, b)
    )


@needs_wordnet
@pytest.mark.parametrize("num_workers", [0, 2])
def test_packed_loader_resumes_bit_identically(wn, num_workers):
    cfg = DataConfig(**{**wn.__dict__, "num_workers": num_workers})
    total = 70  # 300 documents of ~72 tokens: about 50 micro-batches of 4 x 128 per epoch
    with build_train_loader(cfg, DistContext(), micro_batch_size=4, seed=3) as loader:
        ref, cut = [], []
        for i in range(total):
            ref += _take(loader, 1)
            if loader.packer.pending[0][2] > 0:
                cut.append(i + 1)  # a document cut at the end of this micro-batch waits to go on
        efficiency = loader.packing_efficiency
    boundary = [e for e, _ in ref].index(1)  # the first micro-batch holding documents of epoch 1
    assert 30 < boundary < total - 10
    for _, batch in ref:
        _check_rows(batch, 128, 0)
    # mid-epoch with a long document half emitted; right before the batch that crosses the epoch's end
    for k in (next(k for k in cut if k >= 10), boundary):
        with build_train_loader(cfg, DistContext(), micro_batch_size=4, seed=3) as loader:
            head = _take(loader, k)
            state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
        assert _same(head, ref[:k])
        with build_train_loader(cfg, DistContext(), micro_batch_size=4, seed=3) as loader:
            loader.load_state_dict(state)
            tail = _take(loader, total - k)
            assert loader.packing_efficiency == efficiency and loader.samples_seen == 4 * total
        assert _same(tail, ref[k:]), f"resume after {k} batches diverged (workers={num_workers})"


@needs_wordnet
def test_packed_epoch_holds_every_document_once(wn):
    docs = _shard_docs(wn.local)
    with build_train_loader(wn, DistContext(), micro_batch_size=4, seed=5) as loader:
        meta = read_meta(wn.local)
        assert loader.docs_per_fetch == math.ceil(4 * 128 / (meta["tokens"] / meta["documents"]))
        merged: list[tuple[int, list[int]]] = []
        while len(merged) <= len(docs):
            for sid, toks in _pieces(next(loader)):
                if merged and merged[-1][0] == sid:
                    merged[-1][1].extend(toks)  # the next piece of a document cut at a row end
                else:
                    merged.append((sid, list(toks)))
        assert 0.6 < loader.packing_efficiency <= 1.0
    epoch = merged[: len(docs)]
    assert sorted(sid for sid, _ in epoch) == list(range(len(docs)))
    assert all(toks == docs[sid] for sid, toks in epoch)


@needs_wordnet
def test_loader_refuses_a_state_of_other_packing(wn):
    with build_train_loader(wn, DistContext(), micro_batch_size=4, seed=0) as loader:
        next(loader)
        state = loader.state_dict()
    for key, value in (("seq_len", 32), ("docs_per_fetch", 9)):
        cfg = DataConfig(**{**wn.__dict__, key: value})
        with build_train_loader(cfg, DistContext(), micro_batch_size=4, seed=0) as loader:
            with pytest.raises(ConfigError, match=rf"^data\.{key}: the data-loader state was saved with"):
                loader.load_state_dict(state)


@needs_wordnet
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_undecodable_document_is_named_or_skipped(wn, tmp_path, mode):
    """A document whose bytes decode to an id past the vocabulary (the shard file intact): the bad-sample policy."""
    copy = tmp_path / "shards"
    shutil.copytree(wn.local, copy)
    entry = json.loads((copy / "index.json").read_text())["shards"][0]
    assert entry["column_names"][-1] == "tokens"  # the last column: its last two bytes are the last token
    path = copy / entry["raw_data"]["basename"]
    data = bytearray(path.read_bytes())
    end = int(
        np.frombuffer(bytes(data), np.uint32, count=1, offset=4 * (1 + 7 + 1))[0]
    )  # where sample 8 starts
    data[end - 2 : end] = b"\xff\xff"  # sample 7's EOS becomes id 65535
    path.write_bytes(bytes(data))
    cfg = DataConfig(
        **{
            **wn.__dict__,
            "local": str(copy),
            "tokenizer": tokenizer_info(wn).path,
            "bad_samples": mode,
            "shuffle": False,
        }
    )
    with build_train_loader(cfg, DistContext(), micro_batch_size=4, seed=0) as loader:
        if mode == "error":
            with pytest.raises(ShardError, match=rf"{path}: sample 7 .*id 65535 >= vocab_size 300"):
                for _ in range(5):
                    next(loader)
            return
        seen = []
        for _ in range(10):  # well inside epoch 0
            batch = next(loader)
            _check_rows(batch, 128, 0)  # rows stay full: the document is just not packed
            seen += batch["index"].tolist()
        assert loader.epoch == 0 and loader.bad_samples == 1 and loader.last_bad_samples == [7]
        docs = list(dict.fromkeys(seen))  # a document cut at a row end shows once per piece
        assert 7 not in docs and docs[:8] == [0, 1, 2, 3, 4, 5, 6, 8]


@needs_wordnet
def test_load_token_split_and_counts(wn, tmp_path):
    rows = load_token_split(wn, "test", seq_len=48, max_samples=50, local=str(tmp_path / "test"))
    _check_rows(rows, 48, 0)
    assert read_meta(str(tmp_path / "test"))["tokenizer"]["sha256"] == tokenizer_info(wn).sha256
    test_docs = _shard_docs(str(tmp_path / "test"))
    pieces = _pieces(rows)
    assert sum(len(t) for _, t in pieces) == sum(len(d) for d in test_docs)
    assert [sid for sid, _ in pieces] == sorted(sid for sid, _ in pieces)  # shard order, no shuffle
    again = load_token_split(wn, "test", seq_len=48, max_samples=50, local=str(tmp_path / "test"), max_rows=3)
    assert all(torch.equal(again[k], rows[k][:3]) for k in ("input_ids", "positions", "doc_ids"))
    counts = token_counts(wn, "test", local=str(tmp_path / "test"), max_samples=50)
    reference = np.bincount(np.concatenate(test_docs), minlength=300)
    assert counts.tolist() == reference.tolist() and counts[2] == 50  # one EOS per document


@needs_wordnet
def test_cli_converts_text(tmp_path, capsys):
    out = tmp_path / "cli" / "test"
    args = [
        "convert",
        "wordnet",
        "--split",
        "test",
        "--out",
        str(out),
        "--max-samples",
        "40",
        "--vocab-size",
        "280",
    ]
    assert cli_main(args) == 0
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert meta["documents"] == 40 and meta["tokenizer"]["path"].endswith(
        "tokenizer-wordnet-bpe280-first40/tokenizer.json"
    )
    assert cli_main(["list"]) == 0
    assert "wordnet" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- elastic


def _elastic_rank(
    rank: int, world: int, cfg: DataConfig, state: dict | None, k: int, out: str, port: int
) -> None:
    """One rank in a forked process: resume from `state` (any world size), take k micro-batches, save the pieces
    and the final (gathered) state."""
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    try:
        with build_train_loader(cfg, ctx, micro_batch_size=2, seed=1, grad_accum_steps=2 // world) as loader:
            if state is not None:
                loader.load_state_dict(state)
            pieces = [p for _ in range(k) for p in _pieces(next(loader))]
            final = loader.state_dict()
    finally:
        dist.destroy_process_group()
    torch.save({"pieces": pieces, "state": final}, os.path.join(out, f"rank{rank}.pt"))


def _run_ranks(world: int, cfg: DataConfig, state: dict | None, k: int, out: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp = torch.multiprocessing.get_context("fork")
    procs = [
        mp.Process(target=_elastic_rank, args=(r, world, cfg, state, k, str(out), port)) for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0] * world
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@needs_wordnet
@pytest.mark.parametrize("worlds, k", [((2, 1), 5), ((1, 2), 9)])
def test_elastic_resume_loses_and_repeats_no_token(wn, tmp_path, worlds, k):
    """k micro-batches per rank on the first world size, the rest of the epoch and more on the second: every
    token of every document was emitted exactly once, or is still pending in the final state (all ranks)."""
    import_streaming()  # once, here, inherited by the forked ranks
    docs = _shard_docs(wn.local)
    first = _run_ranks(worlds[0], wn, None, k, tmp_path)
    assert all(r["state"] == first[0]["state"] for r in first), "every rank holds every rank's state"
    handed = [p for r in first[0]["state"]["packing"]["ranks"] for p in r["pending"]]
    assert len(handed) > 1 and any(start > 0 for _, start in handed), "a cut document changes hands"
    second = _run_ranks(worlds[1], wn, first[0]["state"], 150 // worlds[1], tmp_path)
    final = second[0]["state"]
    assert final["epoch"] == 1 and all(r["state"] == final for r in second)
    emitted: dict[int, int] = {}
    for r in first + second:
        for sid, toks in r["pieces"]:
            emitted[sid] = emitted.get(sid, 0) + len(toks)
            assert any(docs[sid][i : i + len(toks)] == toks for i in range(len(docs[sid]) - len(toks) + 1))
    for rank in final["packing"]["ranks"]:
        for sid, start in rank["pending"]:
            emitted[sid] = emitted.get(sid, 0) + len(docs[sid]) - start
    # Epoch 0 whole, plus the documents fetched so far in epoch 1 (distinct ones): each exactly once more.
    in_epoch1 = final["streaming"]["sample_in_epoch"]
    assert sorted(emitted) == list(range(len(docs)))
    assert all(emitted[i] in (len(docs[i]), 2 * len(docs[i])) for i in emitted)
    assert sum(emitted[i] == 2 * len(docs[i]) for i in emitted) == in_epoch1 > 0
