"""Data layer: registry, MDS conversion and validation, transforms, exact resume on 1 and 2 ranks.

Uses sklearn's digits (always installed) so nothing skips; Fashion-MNIST only where the Debian package is present.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.config import ConfigError
from pretrain.data import (
    DATASETS,
    DataConfig,
    ImageSource,
    ImageTransform,
    ShardError,
    SourceError,
    build_train_loader,
    convert,
    ensure_shards,
    get_dataset,
    hflip,
    import_streaming,
    list_datasets,
    load_split,
    normalize,
    random_resized_crop,
    read_meta,
    register_dataset,
    resize,
    sample_seed,
    to_tensor,
    validate_shards,
)
from pretrain.data.__main__ import main as cli_main
from pretrain.data.stream import TrainLoader
from pretrain.dist import DistContext

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _take(loader, n: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """n batches as (epoch, index (B,), image (B, C, S, S)); the epoch is read after the batch arrived."""
    out = []
    for _ in range(n):
        batch = next(loader)
        out.append((loader.epoch, batch["index"].clone(), batch["image"].clone()))
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        ea == eb and torch.equal(ia, ib) and torch.equal(xa, xb) for (ea, ia, xa), (eb, ib, xb) in zip(a, b)
    )


# ---------------------------------------------------------------------------------------------- registry, config


def test_registry_duplicate_and_unknown():
    assert {"fashion_mnist", "digits", "image_folder"} <= set(list_datasets())
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits")(type("Again", (ImageSource,), {}))
    with pytest.raises(KeyError) as err:
        get_dataset("imagenet_9000")
    assert "digits" in str(err.value) and "fashion_mnist" in str(err.value)
    with pytest.raises(KeyError, match="Did you mean 'digits'"):
        get_dataset("digit")
    assert get_dataset("digits") is get_dataset("digits") and get_dataset("digits").name == "digits"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"image_size": 0}, "image_size"),
        ({"crop_scale_min": 0.0}, "crop_scale_min"),
        ({"crop_scale_min": 1.5}, "crop_scale_min"),
        ({"dataset": "nope"}, "dataset"),
        ({"dataset": "image_folder"}, "source"),
        ({"dataset": "digits", "split": "validation"}, "split"),
        ({"max_samples": 0}, "max_samples"),
        ({"mean": [0.5, 0.5, 0.5]}, "mean"),
        ({"std": [0.0]}, "std"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_config_validate_names_field(kwargs, field):
    DataConfig().validate()
    with pytest.raises(ConfigError, match=rf"^data\.{field}:"):
        DataConfig(**kwargs).validate()


def test_unknown_dataset_error_lists_registered():
    with pytest.raises(ConfigError, match="digits"):
        DataConfig(dataset="nope").validate()
    with pytest.raises(ConfigError, match=r"^data\.dataset: .*Did you mean 'digits'"):
        DataConfig(dataset="digit").validate()


def test_import_has_no_side_effects():
    code = "import sys, pretrain.data; assert 'streaming' not in sys.modules and 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    assert import_streaming().StreamingDataset is not None


# ---------------------------------------------------------------------------------------------- MDS


def test_convert_roundtrip_multi_shard(tmp_path):
    meta = convert("digits", "train", str(tmp_path / "s"), max_samples=200, size_limit=4096)
    assert meta["count"] == 200 and meta["available"] == 1437 and meta["channels"] == 1
    assert read_meta(str(tmp_path / "s"))["count"] == 200
    index = validate_shards(str(tmp_path / "s"))
    assert len(index["shards"]) > 2 and sum(s["samples"] for s in index["shards"]) == 200
    reader = import_streaming().LocalDataset(str(tmp_path / "s"))
    originals = list(get_dataset("digits").samples("train", max_samples=200))
    for i in (0, 77, 199):  # PNG is lossless: pixels and labels come back exactly
        assert np.array_equal(np.asarray(reader[i]["image"]), np.asarray(originals[i]["image"]))
        assert reader[i]["label"] == originals[i]["label"]
    with pytest.raises(FileExistsError):
        convert("digits", "train", str(tmp_path / "s"), max_samples=10)


def test_digits_split_is_fixed_and_disjoint():
    d = get_dataset("digits")
    assert d.count("train") == 1437 and d.count("test") == 360
    train = {tuple(np.asarray(s["image"]).ravel()) for s in d.samples("train")}
    test = [tuple(np.asarray(s["image"]).ravel()) for s in d.samples("test")]
    assert sum(t in train for t in test) < 10  # only genuine duplicate images may appear in both


def test_interrupted_conversion_leaves_nothing(tmp_path):
    @register_dataset("_explodes_midway")
    class Explodes(ImageSource):
        def samples(self, split, source=None, max_samples=None):
            yield from get_dataset("digits").samples("train", max_samples=30)
            raise RuntimeError("disk on fire")

    try:
        with pytest.raises(RuntimeError, match="disk on fire"):
            convert("_explodes_midway", "train", str(tmp_path / "out"), size_limit=1024)
    finally:
        DATASETS._entries.pop("_explodes_midway")
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == []


def test_leftover_tmp_dir_is_not_a_dataset(tmp_path):
    local = tmp_path / "shards"
    stale = tmp_path / "shards.tmp-12345"  # what a killed converter leaves behind
    stale.mkdir()
    (stale / "shard.00000.mds").write_bytes(b"partial")
    with pytest.raises(ShardError, match="does not exist"):
        validate_shards(str(local))
    out = ensure_shards(DataConfig(dataset="digits", local=str(local), max_samples=40), DistContext())
    assert out == str(local) and read_meta(out)["count"] == 40


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "digits"
    convert("digits", "test", str(path), max_samples=120, size_limit=2048)
    return path


def test_validate_shards_names_the_file(small_shards, tmp_path):
    index = json.loads((small_shards / "index.json").read_text())
    shard = index["shards"][1]["raw_data"]
    assert len(index["shards"]) >= 3

    missing = tmp_path / "missing"
    shutil.copytree(small_shards, missing)
    (missing / shard["basename"]).unlink()
    with pytest.raises(ShardError, match="missing shard file") as err:
        validate_shards(str(missing))
    assert str(missing / shard["basename"]) in str(err.value)

    truncated = tmp_path / "truncated"
    shutil.copytree(small_shards, truncated)
    path = truncated / shard["basename"]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ShardError) as err:
        validate_shards(str(truncated))
    assert str(err.value) == f"{path}: truncated: expected {shard['bytes']} bytes, got 100"

    corrupt = tmp_path / "corrupt"
    shutil.copytree(small_shards, corrupt)
    (corrupt / "index.json").write_text('{"shards": [')
    with pytest.raises(ShardError, match="bad JSON") as err:
        validate_shards(str(corrupt))
    assert str(corrupt / "index.json") in str(err.value)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda s: s.pop("raw_data"), r"shards\[1\]: no 'raw_data'"),
        (lambda s: s["raw_data"].pop("basename"), r"shards\[1\]: 'raw_data' has no 'basename'"),
        (lambda s: s["raw_data"].pop("bytes"), r"shards\[1\]: 'raw_data.bytes' must be an integer"),
        (lambda s: s["raw_data"].update(bytes="123"), r"shards\[1\]: 'raw_data.bytes' must be an integer"),
        (lambda s: s["raw_data"].update(basename=7), r"shards\[1\]: 'raw_data' has no 'basename'"),
        (lambda s: s.update(raw_data="shard.00001.mds"), r"shards\[1\]: 'raw_data' must be an object"),
        (lambda s: s.pop("samples"), r"shards\[1\]: 'samples' must be an integer"),
    ],
)
def test_validate_shards_malformed_entry(small_shards, tmp_path, edit, expected):
    index = json.loads((small_shards / "index.json").read_text())
    edit(index["shards"][1])
    bad = tmp_path / "bad"
    shutil.copytree(small_shards, bad)
    (bad / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=expected) as err:
        validate_shards(str(bad))
    assert str(err.value).startswith(str(bad / "index.json"))
    assert cli_main(["verify", str(bad)]) == 2  # one line on stderr, no traceback


@pytest.mark.parametrize(
    "index", [{"shards": {"0": {}}}, {"shards": 5}, {"shards": "shard.00000.mds"}, {"version": 2}, [1, 2]]
)
def test_validate_shards_needs_a_shards_list(small_shards, tmp_path, index):
    bad = tmp_path / "bad"
    shutil.copytree(small_shards, bad)
    (bad / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match="no 'shards' list") as err:
        validate_shards(str(bad))
    assert str(bad / "index.json") in str(err.value)
    (bad / "index.json").write_text(json.dumps({"shards": [3]}))
    with pytest.raises(ShardError, match=r"shards\[0\]: expected an object, got int"):
        validate_shards(str(bad))


def _write_image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 3), ("dog", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_image_folder(tmp_path):
    src = tmp_path / "photos"
    _write_image_folder(src)
    meta = convert("image_folder", "train", str(tmp_path / "s"), source=str(src))
    assert meta["classes"] == ["cat", "dog"] and meta["count"] == 5 and meta["channels"] == 3
    images, labels = load_split("image_folder", "train", 16, local=str(tmp_path / "s"), source=str(src))
    assert images.shape == (5, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1, 1]

    broken = src / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(SourceError, match="cannot decode") as err:
        convert("image_folder", "train", str(tmp_path / "s2"), source=str(src))
    assert str(broken) in str(err.value)
    assert not (tmp_path / "s2").exists()


# ---------------------------------------------------------------------------------------------- transforms


def test_transforms_shapes_and_determinism():
    img = Image.fromarray(np.arange(20 * 30, dtype=np.uint8).reshape(20, 30) % 251)
    x = to_tensor(img)
    assert x.shape == (1, 20, 30) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert x[0, 0, 1].item() == pytest.approx(1 / 255)
    assert resize(x, 8).shape == (1, 8, 8)

    torch.manual_seed(0)
    expected_global = torch.rand(3)
    torch.manual_seed(0)
    a = random_resized_crop(x, 16, (0.35, 1.0), generator=torch.Generator().manual_seed(5))
    b = random_resized_crop(x, 16, (0.35, 1.0), generator=torch.Generator().manual_seed(5))
    c = random_resized_crop(x, 16, (0.35, 1.0), generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.rand(3), expected_global)  # the global RNG was not touched
    assert a.shape == (1, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError):
        random_resized_crop(x, 16)

    assert torch.equal(hflip(x, torch.Generator(), p=1.0), x.flip(-1))
    assert torch.equal(hflip(x, torch.Generator(), p=0.0), x)
    y = normalize(torch.ones(3, 2, 2), [0.5, 0.0, 1.0], [0.5, 2.0, 1.0])
    assert y[:, 0, 0].tolist() == [1.0, 0.5, 0.0]

    t = ImageTransform(image_size=8, mean=(0.5,), std=(0.25,))
    assert torch.allclose(t(img), (resize(x, 8) - 0.5) / 0.25)  # eval: resize + normalize, no RNG needed
    with pytest.raises(ValueError):
        ImageTransform(8, (0.5,), (0.25,), augment=True)(img)


# ---------------------------------------------------------------------------------------------- streaming


def _digits_cfg(tmp_path: Path, **kw) -> DataConfig:
    base = dict(
        dataset="digits", local=str(tmp_path / "train100"), max_samples=100, image_size=8, num_workers=0
    )
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_exact_resume_one_rank(tmp_path, num_workers):
    cfg = _digits_cfg(tmp_path, num_workers=num_workers)
    seed, total = 7, 30
    with build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=seed) as loader:
        assert loader.batches_per_epoch == 12  # 100 samples // 8, last 4 dropped
        ref = _take(loader, total)
        assert loader.epoch == 2 and loader.samples_seen == 8 * total

    epochs = [e for e, _, _ in ref]
    assert epochs == [0] * 12 + [1] * 12 + [2] * 6
    first = torch.cat([i for _, i, _ in ref[:12]])
    second = torch.cat([i for _, i, _ in ref[12:24]])
    assert len(set(first.tolist())) == 96 and not torch.equal(first, second)  # reshuffled each epoch

    # Each image is exactly the transform of the stored sample under the (seed, epoch, index) generator: this
    # is what pins the epoch seen inside DataLoader workers to streaming's epoch.
    reader = import_streaming().LocalDataset(cfg.local)
    info = get_dataset("digits")
    t = ImageTransform(8, info.mean, info.std, augment=True, crop_scale_min=cfg.crop_scale_min)
    for epoch, index, image in (ref[0], ref[13], ref[29]):
        for j in (0, 5):
            gen = torch.Generator().manual_seed(sample_seed(seed, epoch, int(index[j])))
            assert torch.equal(image[j], t(reader[int(index[j])]["image"], gen))

    for k in (7, 12, 17):  # mid-epoch, exactly at the epoch boundary, mid-second-epoch
        with build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=seed) as loader:
            head = _take(loader, k)
            state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON checkpoint
        assert _same(head, ref[:k])
        with build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=seed) as loader:
            loader.load_state_dict(state)
            tail = _take(loader, total - k)
            assert loader.samples_seen == 8 * total
        assert _same(tail, ref[k:]), f"resume after {k} batches diverged"


def test_loader_errors_name_the_config_key(tmp_path):
    cfg = _digits_cfg(tmp_path)
    with pytest.raises(ConfigError, match="^seed: .* got -1"):
        build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=-1)
    with pytest.raises(ConfigError) as err:
        build_train_loader(cfg, DistContext(), micro_batch_size=128, seed=0)
    assert str(err.value) == (
        f"train.micro_batch_size: 128 is more than the 100 samples each of the 1 ranks gets from {cfg.local}"
    )
    with build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=0) as loader:
        state = loader.state_dict()
    for key, batch, seed, values in (("train.micro_batch_size", 16, 0, (8, 16)), ("seed", 8, 1, (0, 1))):
        fresh = TrainLoader(dataset=None, loader=None, world_size=1, micro_batch_size=batch, seed=seed)
        with pytest.raises(
            ConfigError, match=rf"^{key}: .*saved with {values[0]}, this run has {values[1]};"
        ):
            fresh.load_state_dict(state)  # refused before the (absent) streaming loader is touched


def test_ensure_shards_refuses_a_rank_without_process_group(tmp_path):
    cfg = DataConfig(dataset="digits", local=str(tmp_path / "s"), max_samples=40)
    with pytest.raises(RuntimeError, match="rank 1 of 2 has no process group"):
        ensure_shards(cfg, DistContext(rank=1, world_size=2))
    assert not (tmp_path / "s").exists()


def test_augmentation_differs_across_epochs(tmp_path):
    def by_index(aug: bool) -> list[dict[int, torch.Tensor]]:
        cfg = _digits_cfg(tmp_path, augment=aug)
        with build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=3) as loader:
            batches = _take(loader, 24)
        per_epoch: list[dict[int, torch.Tensor]] = [{}, {}]
        for epoch, index, image in batches:
            per_epoch[epoch].update(zip(index.tolist(), image))
        return per_epoch

    e0, e1 = by_index(True)
    common = sorted(set(e0) & set(e1))
    assert len(common) > 80
    assert sum(not torch.equal(e0[i], e1[i]) for i in common) > 0.9 * len(common)
    p0, p1 = by_index(False)
    assert all(torch.equal(p0[i], p1[i]) for i in common)


def test_remote_streamed_into_local_cache(tmp_path):
    remote, cache = tmp_path / "remote", tmp_path / "cache"
    cfg = DataConfig(
        dataset="digits",
        split="test",
        remote=str(remote),
        local=str(cache),
        image_size=8,
        num_workers=0,
        shuffle=False,
        augment=False,
    )
    with pytest.raises(ShardError, match="python -m pretrain.data convert digits --split test"):
        ensure_shards(cfg, DistContext())
    convert("digits", "test", str(remote), size_limit=4096)
    first = build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=0)
    with pytest.raises(ValueError, match="Reused local directory"):  # streaming: one live dataset per cache
        build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=0)
    first.close()  # releases the cache dir for the next loader
    with build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=0) as loader:
        seen = torch.cat([next(loader)["index"] for _ in range(loader.batches_per_epoch)])
    assert sorted(seen.tolist()) == list(range(360))
    remote_shards = sorted(p.name for p in remote.glob("*.mds"))
    assert len(remote_shards) > 3 and sorted(p.name for p in cache.glob("*.mds")) == remote_shards
    images, labels = load_split("digits", "test", 8, local=str(cache))
    assert images.shape == (360, 1, 8, 8) and labels.dtype == torch.int64


def test_ensure_shards_converts_on_first_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(dataset="digits", max_samples=40)
    local = ensure_shards(cfg, DistContext())
    assert local == os.path.join("data", "shards", "digits", "train-first40")
    stamp = os.path.getmtime(os.path.join(local, "index.json"))
    assert ensure_shards(cfg, DistContext()) == local
    assert os.path.getmtime(os.path.join(local, "index.json")) == stamp  # not converted twice
    for other in (dict(max_samples=20), dict(split="test")):  # the train loader would read 40 train samples
        with pytest.raises(ShardError, match="tessera.json"):
            ensure_shards(DataConfig(dataset="digits", local=local, **other), DistContext())
    images, labels = load_split("digits", "train", 8, max_samples=40)
    assert images.shape == (40, 1, 8, 8) and abs(images.mean().item()) < 0.3
    ensure_shards(
        DataConfig(dataset="digits"), DistContext()
    )  # the full split, as a training run converts it
    images30, labels30 = load_split("digits", "train", 8, max_samples=30)  # read from it: no third conversion
    assert sorted(os.listdir(os.path.join("data", "shards", "digits"))) == ["train", "train-first40"]
    assert torch.equal(images30, images[:30]) and torch.equal(labels30, labels[:30])


# ---------------------------------------------------------------------------------------------- two ranks


def _two_rank_main(rank: int, world: int, out_dir: str, port: int) -> None:
    """One rank, in a forked process: ensure_shards with rank 0 converting, then the resume checks.

    Forked rather than spawned so the children skip the ~5 s `import streaming` (transformers) each.
    """
    import torch.distributed as dist

    # What torchrun exports; streaming reads rank and world size from these.
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    results = {}
    try:
        # Rank 0 fails to convert: every rank must raise (not hang), rank 1 with rank 0's reason.
        bad = DataConfig(
            dataset="image_folder", source=os.path.join(out_dir, "no_such_dir"), local=out_dir + "/x"
        )
        try:
            ensure_shards(bad, ctx)
        except ValueError as err:
            results["error"] = str(err)
        for workers in (0, 2):
            cfg = DataConfig(
                dataset="digits",
                local=os.path.join(out_dir, "shards"),
                max_samples=160,
                image_size=8,
                num_workers=workers,
            )
            with build_train_loader(cfg, ctx, micro_batch_size=8, seed=11) as loader:
                ref = _take(loader, 25)
                bpe = loader.batches_per_epoch
            with build_train_loader(cfg, ctx, micro_batch_size=8, seed=11) as loader:
                _take(loader, 13)
                state = loader.state_dict()
            with build_train_loader(cfg, ctx, micro_batch_size=8, seed=11) as loader:
                loader.load_state_dict(state)
                tail = _take(loader, 12)
            results[workers] = {"ref": ref, "tail": tail, "state": state, "bpe": bpe}
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_ranks_disjoint_and_exact_resume(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import_streaming()  # once, here, inherited by both forked ranks
    mp = torch.multiprocessing.get_context("fork")
    procs = [mp.Process(target=_two_rank_main, args=(rank, 2, str(tmp_path), port)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
        codes = [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert codes == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert "no_such_dir" in r0["error"] and "no_such_dir" in r1["error"]
    assert r1["error"].startswith("rank 0 could not prepare the shards")
    for workers in (0, 2):
        a, b = r0[workers], r1[workers]
        assert a["bpe"] == b["bpe"] == 10  # 160 samples / 2 ranks / 8
        assert a["state"] == b["state"] and a["state"]["samples_seen"] == 13 * 8 * 2
        epoch0 = [set(torch.cat([i for _, i, _ in r["ref"][:10]]).tolist()) for r in (a, b)]
        assert not epoch0[0] & epoch0[1] and epoch0[0] | epoch0[1] == set(range(160))
        for r in (a, b):
            assert _same(r["tail"], r["ref"][13:]), f"2-rank resume diverged (workers={workers})"


# ---------------------------------------------------------------------------------------------- real data, CLI


@pytest.mark.skipif(not FASHION.exists(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist(tmp_path):
    info = get_dataset("fashion_mnist")
    assert info.count("train") == 60000 and info.count("test") == 10000
    meta = convert("fashion_mnist", "train", str(tmp_path / "fm"), max_samples=300)
    assert meta["available"] == 60000 and meta["count"] == 300
    images, labels = load_split("fashion_mnist", "train", 28, local=str(tmp_path / "fm"))
    assert images.shape == (300, 1, 28, 28) and labels[:5].tolist() == [9, 0, 0, 3, 0]


def test_fashion_mnist_missing_files_message(tmp_path):
    with pytest.raises(SourceError, match="apt-get install dataset-fashion-mnist"):
        next(get_dataset("fashion_mnist").samples("train", source=str(tmp_path)))


def test_cli(tmp_path, capsys):
    assert cli_main(["list"]) == 0
    assert "digits" in capsys.readouterr().out
    out = tmp_path / "cli"
    assert cli_main(["convert", "digits", "--split", "test", "--out", str(out), "--max-samples", "50"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["count"] == 50
    assert cli_main(["verify", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 50
    assert cli_main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert cli_main(["convert", "nope"]) == 2
    err = capsys.readouterr().err
    assert "data.dataset: unknown dataset 'nope'" in err and "digits" in err
