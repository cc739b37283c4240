"""Zero-shot classification and image<->text retrieval (pretrain.zeroshot) and their monitor for two-tower models
(pretrain.monitor): the scores against naive loops written here, ties counted pessimistically, 1 rank vs
simulated 2 and 3 ranks (the same bits), training state untouched, and the config refusals."""

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain import monitor as monitor_mod
from pretrain import zeroshot
from pretrain.config import Config, ConfigError, EvalConfig
from pretrain.dist import DistContext
from pretrain.monitor import Monitor, PairEval, Shards
from tests.conftest import ROOT, read_metrics

# --- naive references ------------------------------------------------------------------------------------


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def naive_rank(scores: list[float], right: int) -> int:
    """Place of item `right` when every other item scoring at least as much goes first."""
    return sum(1 for j, s in enumerate(scores) if j != right and s >= scores[right])


# --- the pure functions ---------------------------------------------------------------------------------------


def test_class_embeddings_average_normalized_templates_then_renormalize():
    g = torch.Generator().manual_seed(0)
    n_classes, n_templates, vocab, dim = 3, 4, 20, 6
    table = torch.randn(vocab, dim, generator=g) * torch.rand(vocab, 1, generator=g) * 5  # unequal lengths
    ids = torch.randint(0, vocab, (n_classes * n_templates, 5), generator=g)  # (C * T, L)
    mask = torch.ones_like(ids)
    mask[:, 3:] = torch.randint(0, 2, (len(ids), 2), generator=g)
    calls = []

    def encode_text(i, m):  # an un-normalized "tower": the masked sum of token vectors
        calls.append(len(i))
        return (table[i] * m[..., None]).sum(1)  # (b, E)

    got = zeroshot.class_embeddings(encode_text, ids, mask, n_classes, n_templates, batch=5)
    assert calls == [5, 5, 2]  # chunks across class boundaries
    for c in range(n_classes):
        vecs = []
        for t in range(n_templates):
            row = c * n_templates + t  # class-major
            v = [
                sum(table[i][d].item() * m for i, m in zip(ids[row].tolist(), mask[row].tolist()))
                for d in range(dim)
            ]
            vecs.append(unit(v))
        mean = unit([sum(v[d] for v in vecs) / n_templates for d in range(dim)])
        assert got[c].tolist() == pytest.approx(mean, abs=1e-6)
    # the plain mean without the per-prompt normalization is a different vector: the test can tell them apart
    plain = F.normalize(encode_text(ids, mask).view(n_classes, n_templates, dim).mean(1), dim=-1)
    assert (plain - got).abs().max() > 1e-2
    assert zeroshot.prompts(["cat", "dog"], ["a {}.", "{}!"]) == ["a cat.", "cat!", "a dog.", "dog!"]
    with pytest.raises(ValueError, match="3 classes x 4 templates"):
        zeroshot.template_mean(torch.randn(11, dim), 3, 4)


def test_zero_shot_accuracy_matches_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    images, classes = torch.randn(40, 6, generator=g), torch.randn(7, 6, generator=g)
    labels = torch.randint(0, 7, (40,), generator=g)
    got = zeroshot.zero_shot_accuracy(images, classes, labels, topk=(1, 3, 5), chunk=9)
    cls = [unit(c) for c in classes.tolist()]
    for k in (1, 3, 5):
        hits = sum(
            naive_rank([dot(unit(x), c) for c in cls], y) < k
            for x, y in zip(images.tolist(), labels.tolist())
        )
        assert got[f"top{k}"] == hits / 40
    assert 0 < got["top1"] < got["top3"] < got["top5"] < 1
    with pytest.raises(ValueError, match="only 7 classes"):
        zeroshot.zero_shot_accuracy(images, classes, labels, topk=(1, 10))


def test_ties_count_against_the_right_answer():
    """Image 0 is equally close to classes 0 and 1 (label 1): pessimistic, the wrong class 0 goes first. A
    collapsed model (all embeddings equal) scores 0, not what index order would give."""
    classes = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    images = torch.tensor([[1.0, 0.0], [-1.0, 0.1]])
    acc = zeroshot.zero_shot_accuracy(images, classes, torch.tensor([1, 2]), topk=(1, 2))
    assert acc == {"top1": 0.5, "top2": 1.0}
    same = torch.ones(5, 3)
    assert zeroshot.zero_shot_accuracy(same, torch.ones(4, 3), torch.zeros(5, dtype=torch.long), (1,)) == {
        "top1": 0.0
    }
    recall = zeroshot.retrieval_recall(same, same, ks=(1, 4, 5))
    assert recall == {
        "i2t_R@1": 0.0,
        "i2t_R@4": 0.0,
        "i2t_R@5": 1.0,
        "t2i_R@1": 0.0,
        "t2i_R@4": 0.0,
        "t2i_R@5": 1.0,
    }


def test_retrieval_recall_matches_a_naive_loop_with_ties():
    g = torch.Generator().manual_seed(2)
    n = 30
    images = torch.randn(n, 5, generator=g)
    texts = images + 0.9 * torch.randn(n, 5, generator=g)  # related, imperfectly
    texts[7] = texts[3] * 2.0  # captions 3 and 7 embed the same direction: exact cosine ties
    images[11] = images[12]  # and two images
    got = zeroshot.retrieval_recall(images, texts, ks=(1, 5, 10), chunk=7)
    img, txt = [unit(v) for v in images.tolist()], [unit(v) for v in texts.tolist()]
    for k in (1, 5, 10):
        i2t = sum(naive_rank([dot(img[i], t) for t in txt], i) < k for i in range(n)) / n
        t2i = sum(naive_rank([dot(txt[i], x) for x in img], i) < k for i in range(n)) / n
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t, abs=0) and got[f"t2i_R@{k}"] == pytest.approx(
            t2i, abs=0
        )
    assert 0 < got["i2t_R@1"] < got["i2t_R@10"] < 1
    assert set(got) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_chance_levels():
    c = zeroshot.chance_levels(n_pairs=200, n_classes=8)
    assert c == {
        "i2t_R@1": 1 / 200,
        "t2i_R@1": 1 / 200,
        "i2t_R@5": 5 / 200,
        "t2i_R@5": 5 / 200,
        "i2t_R@10": 10 / 200,
        "t2i_R@10": 10 / 200,
        "top1": 1 / 8,
        "top5": 5 / 8,
    }
    assert zeroshot.chance_levels(n_pairs=4)["i2t_R@10"] == 1.0 and "top1" not in zeroshot.chance_levels(4)


def test_similarity_picture_is_a_visible_heat_map():
    emb = torch.eye(16)  # image i == caption i: a bright diagonal on a dark field
    pic = zeroshot.similarity_picture(emb, emb)
    assert pic.shape == (256, 256, 3) and pic.dtype == torch.uint8
    brightness = pic.float().sum(-1)  # (256, 256)
    cell = brightness[::16, ::16]  # one pixel per matrix entry
    assert torch.equal(brightness[:16, :16], brightness[0, 0].expand(16, 16))  # upsampled by blocks
    diag, off = cell.diagonal(), cell[~torch.eye(16, dtype=torch.bool)]
    assert diag.min() > off.max()
    # min-max scaled: the extremes are the colour ramp's two ends
    ends = (zeroshot._RAMP[[-1, 0]] * 255).round().to(torch.uint8)
    assert torch.equal(pic[0, 0], ends[0]) and torch.equal(pic[0, 16], ends[1])
    flat = zeroshot.similarity_picture(torch.ones(3, 4), torch.ones(5, 4))  # all equal: no NaN, one colour
    assert flat.shape == (3 * 51, 5 * 51, 3) and (flat == flat[0, 0]).all()  # 256 // 5 = 51 px per entry


def test_check_class_names():
    zeroshot.check_class_names(["a", "b"], "eval.class_names")
    with pytest.raises(ConfigError, match="data.dataset: the zero-shot class list is empty"):
        zeroshot.check_class_names([], "data.dataset")
    with pytest.raises(ConfigError, match=r"data.dataset: duplicated class names \['b', 'a'\]"):
        zeroshot.check_class_names(["b", "a", "b", "c", "a", "b"], "data.dataset")


# --- a fake two-tower model and held-out pairs ----------------------------------------------------------------


class FakeTwoTower(nn.Module):
    """The shared two-tower interface in miniature; draws from every random stream and records its calls."""

    modality = "image_text"

    def __init__(self, vocab: int = 30, dim: int = 8):
        super().__init__()
        self.image_proj = nn.Linear(3 * 4 * 4, dim)
        self.tokens = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(0.5)  # training mode would change the embeddings
        self.calls = []

    def _noise(self):
        return 0 * (torch.rand(()) + np.random.rand() + random.random())

    def encode_image(self, images, ids_keep=None, normalize=True):
        self.calls.append(("image", len(images), self.training, torch.is_grad_enabled()))
        x = self.drop(self.image_proj(images.flatten(1))) + self._noise()  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids, attention_mask=None, normalize=True):
        self.calls.append(("text", len(input_ids), self.training, torch.is_grad_enabled()))
        m = attention_mask[..., None].float()  # (B, L, 1)
        x = self.drop((self.tokens(input_ids) * m).sum(1) / m.sum(1)) + self._noise()  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x


class FakeObjective(nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.backbone = tower


def fake_pairs(n: int = 23, classes: int = 6, length: int = 7, seed: int = 0):
    """Held-out pairs shaped as pretrain.data.split.load_pairs returns them, and class-major prompts."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.int64)
    for i in range(n):
        mask[i, 2 + i % (length - 2) :] = 0
    pairs = SimpleNamespace(
        images=torch.randn(n, 3, 4, 4, generator=g),
        input_ids=torch.randint(0, 30, (n, length), generator=g),
        attention_mask=mask,
        labels=torch.randint(0, classes, (n,), generator=g),
        class_names=[f"class {c}" for c in range(classes)],
        captions=[f"caption {i}" for i in range(n)],
    )
    prompt_ids = torch.randint(0, 30, (classes * 2, length), generator=g)
    return pairs, (prompt_ids, torch.ones_like(prompt_ids))


def simulate(world: int, tower, pairs, prompts, e) -> list[tuple[dict, list]]:
    """Every rank of a `world`-rank job in this process: first each rank embeds its chunks (its local rows are
    kept), then each rank embeds again with the gather answering every rank's rows, as all_gather would."""
    evals = [
        PairEval(DistContext(rank=r, world_size=world), tower, pairs, prompts, 6, 2, e) for r in range(world)
    ]
    names = ("images", "captions", "prompts")
    local = {name: [None] * world for name in names}
    for r, ev in enumerate(evals):
        for name in names:
            sh = getattr(ev, name)

            def keep(x, r=r, name=name, sh=sh):  # pass 1: record, answer zeros of the right shapes
                local[name][r] = x
                return [x.new_zeros(sum(sh.sizes[q::world]), *x.shape[1:]) for q in range(world)]

            sh.gather = keep
        with torch.no_grad():
            ev.embeddings()
    out = []
    for ev in evals:
        for name in names:
            getattr(ev, name).gather = lambda x, name=name: local[name]
        tower.calls.clear()
        with torch.no_grad():
            emb = ev.embeddings()
        out.append((emb, list(tower.calls)))
    return out


def test_ranks_embed_and_score_exactly_as_one():
    """Chunks of 4: 23 images -> 6 chunks, 23 captions -> 6, 12 prompts -> 3. On 2 and 3 ranks every rank gets
    the 1-rank embeddings bit for bit, runs as many forwards of each tower as every other rank (a rank out of
    chunks embeds a dummy row), and scores the same numbers."""
    torch.manual_seed(0)
    tower = FakeTwoTower().eval()
    pairs, prompts = fake_pairs()
    e = EvalConfig(batch_size=4)
    one = PairEval(DistContext(), tower, pairs, prompts, 6, 2, e)
    with torch.no_grad():
        ref = one.embeddings()
    assert ref["image"].shape == (23, 8) and ref["text"].shape == (23, 8) and ref["class"].shape == (6, 8)
    ref_scores, ref_picture = one.score(ref)
    assert sorted(ref_scores) == sorted(
        ["zeroshot_top1", "zeroshot_top5", *(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))]
    )
    assert ref_picture.shape == (3, 256, 256) and 0 <= ref_picture.min() and ref_picture.max() <= 1
    for world in (2, 3):
        results = simulate(world, tower, pairs, prompts, e)
        rounds = [len(calls) for _, calls in results]
        assert rounds == [math.ceil(6 / world) * 2 + math.ceil(3 / world)] * world, (world, rounds)
        kinds = [[kind for kind, *_ in calls] for _, calls in results]
        assert all(k == kinds[0] for k in kinds)  # the same tower in the same order on every rank
        for emb, _ in results:
            assert all(torch.equal(emb[k], ref[k]) for k in ("image", "text", "class")), world
            scores, picture = one.score(emb)
            assert scores == ref_scores and torch.equal(picture, ref_picture)


def test_shards_put_gathered_rows_back_in_order():
    """Rank 1 of 3 owns chunks 1 and 4 of 5 (rows 3-5 and 12): the gathered parts go back in row order."""
    x = torch.arange(13.0)[:, None]  # (13, 1): row i holds i
    sh = Shards(x, 3, DistContext(rank=1, world_size=3))
    assert sh.sizes == [3, 3, 3, 3, 1] and sh.rounds == 2 and sorted(sh.chunks) == [1, 4]
    parts = [torch.tensor([[0.0], [1], [2], [9], [10], [11]]), torch.tensor([[3.0], [4], [5], [12]])]
    parts.append(torch.tensor([[6.0], [7], [8]]))
    seen = []
    out = sh.embed(lambda c: seen.append(c.clone()) or c, gather=lambda local: parts)
    assert torch.equal(out, x) and torch.equal(seen[1], x[12:13])  # its second chunk: row 12
    sh2 = Shards(x, 3, DistContext(rank=2, world_size=3))  # chunk 2 only: a dummy second forward
    seen.clear()
    sh2.embed(lambda c: seen.append(c.clone()) or c, gather=lambda local: parts)
    assert [len(c) for c in seen] == [3, 1] and torch.equal(seen[1], x[:1])


# --- the monitor -----------------------------------------------------------------------------------------------


@pytest.fixture
def pair_monitor(monkeypatch):
    """A Monitor over the fake tower: the config checks and the data loading are replaced (the real ones need
    a registered image-text model and dataset; tests/test_monitor.py-style runs cover them end to end)."""
    pairs, prompts = fake_pairs()

    def build(pairs=pairs, prompts=prompts, names=None, **changes):
        cfg = Config()
        cfg.eval = EvalConfig(interval=3, batch_size=5, **changes)
        monkeypatch.setattr(monitor_mod, "check_eval_config", lambda cfg: None)
        given = names if names is not None else pairs.class_names
        monkeypatch.setattr(
            Monitor, "_read_pairs", lambda self: (pairs, prompts, cfg.eval.class_names or given)
        )
        cfg.train.max_steps = 10
        tower = FakeTwoTower()
        return Monitor(cfg, DistContext(), FakeObjective(tower).train()), tower

    return build


def test_monitor_scores_two_towers_and_leaves_training_alone(pair_monitor):
    monitor, tower = pair_monitor()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    out = monitor.evaluate(step=3, train_time=20.0)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]
    assert monitor.module.training and tower.training  # back in train mode
    # 23 images, 23 captions, 12 prompts in chunks of 5; eval mode, no grad
    expected = [("image", 5, False, False)] * 4 + [("image", 3, False, False)]
    expected += [("text", 5, False, False)] * 4 + [("text", 3, False, False)]
    expected += [("text", 5, False, False)] * 2 + [("text", 2, False, False)]
    assert tower.calls == expected
    keys = ["zeroshot_top1", "zeroshot_top5", *(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))]
    assert sorted(out) == sorted([f"eval/{k}" for k in keys] + ["eval/time_s", "eval/time_fraction"])
    assert out["eval/time_fraction"] == out["eval/time_s"] / 20.0
    assert list(monitor.pictures) == ["eval/similarity"] and monitor.pictures["eval/similarity"].shape == (
        3,
        256,
        256,
    )
    # the scores are the pure functions' on the embeddings the monitor gathers
    emb = monitor.pair_embeddings()
    recall = zeroshot.retrieval_recall(emb["image"], emb["text"])
    assert all(out[f"eval/{k}"] == v for k, v in recall.items())
    acc = zeroshot.zero_shot_accuracy(emb["image"], emb["class"], monitor.pairs.labels)
    assert out["eval/zeroshot_top1"] == acc["top1"] and out["eval/zeroshot_top5"] == acc["top5"]
    assert [monitor.due(s) for s in (1, 3, 4, 9, 10)] == [False, True, False, True, True]


def test_monitor_flags_choose_what_is_embedded_and_scored(pair_monitor):
    monitor, tower = pair_monitor(retrieval=False)
    out = monitor.evaluate(step=3, train_time=1.0)
    assert sorted(k for k in out if "time" not in k) == ["eval/zeroshot_top1", "eval/zeroshot_top5"]
    assert (
        sum(n for kind, n, *_ in tower.calls if kind == "text") == 16 + 12
    )  # the picture's captions, prompts
    monitor, tower = pair_monitor(zero_shot=False)
    out = monitor.evaluate(step=3, train_time=1.0)
    assert not any("zeroshot" in k for k in out) and "eval/t2i_R@10" in out
    assert sum(n for kind, n, *_ in tower.calls if kind == "text") == 23  # no prompts
    pairs, prompts = fake_pairs(classes=4)  # fewer than 5 classes: no top-5
    prompts = (prompts[0][:8], prompts[1][:8])
    monitor, _ = pair_monitor(pairs=pairs, prompts=prompts)
    assert "eval/zeroshot_top5" not in monitor.evaluate(step=3, train_time=1.0)


def test_monitor_refuses_bad_class_lists(pair_monitor):
    with pytest.raises(ConfigError, match=r"data.dataset: duplicated class names \['b'\]"):
        pair_monitor(names=["a", "b", "c", "b", "d", "e"])
    with pytest.raises(ConfigError, match="data.dataset: the zero-shot class list is empty"):
        pair_monitor(names=[])
    with pytest.raises(ConfigError, match="eval.class_names: 5 class names, but .* has 6 classes"):
        pair_monitor(class_names=["a", "b", "c", "d", "e"])
    pairs, prompts = fake_pairs()
    pairs.labels = None
    with pytest.raises(ConfigError, match="eval.zero_shot"):
        pair_monitor(pairs=pairs)


# --- config refusals --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        ({"templates": []}, "eval.templates: must hold at least one template"),
        ({"templates": ["a {}.", "a photo"]}, r"eval.templates\[1\]: 'a photo'"),
        ({"templates": ["{} and {}"]}, r"eval.templates\[0\]"),
        ({"templates": ["a {name}"]}, r"eval.templates\[0\]"),
        ({"templates": ["a {} {x}"]}, r"eval.templates\[0\]"),
        ({"class_names": []}, "eval.class_names: the class list is empty"),
        (
            {"class_names": ["cat", "dog", "cat", "owl", "dog"]},
            r"eval.class_names: duplicated class names \['cat', 'dog'\]",
        ),
    ],
)
def test_config_refuses_bad_templates_and_class_lists(change, match):
    cfg = Config()
    for key, value in change.items():
        setattr(cfg.eval, key, value)
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_config_accepts_the_defaults_and_parses_lists():
    from pretrain.config import read_tree

    cfg = Config().validate()
    assert cfg.eval.templates == ["a photo of a {}.", "a {}."] and cfg.eval.zero_shot and cfg.eval.retrieval
    tree = read_tree(None, ["eval.templates=['an emoji of {}.']", "eval.class_names=[smileys, animals]"])
    assert tree["eval"] == {"templates": ["an emoji of {}."], "class_names": ["smileys", "animals"]}


class PairSource:
    modality, splits, fields = "image_text", ("train", "test"), ("image", "text", "label")


@pytest.mark.parametrize(
    "source, changes, match",
    [
        (SimpleNamespace(modality="image_text", splits=None, fields=("image", "text")), {}, "eval.zero_shot"),
        (
            SimpleNamespace(modality="image_text", splits=None, fields=("image", "text")),
            {"zero_shot": False},
            None,
        ),
        (PairSource(), {}, None),
        (PairSource(), {"zero_shot": False, "retrieval": False}, "eval.interval: .* nothing to score"),
        (
            SimpleNamespace(modality="image", splits=("train", "test"), fields=("image", "label")),
            {},
            "data.dataset",
        ),
        (
            SimpleNamespace(modality="image_text", splits=("train",), fields=("image", "text", "label")),
            {},
            "test split",
        ),
    ],
)
def test_check_eval_config_for_two_towers(monkeypatch, source, changes, match):
    import pretrain.build
    import pretrain.data.sources

    monkeypatch.setattr(pretrain.build, "model_modality", lambda name: "image_text")
    monkeypatch.setattr(pretrain.data.sources, "get_dataset", lambda name: source)
    cfg = Config()
    cfg.eval.interval = 5
    for key, value in changes.items():
        setattr(cfg.eval, key, value)
    if match is None:
        monitor_mod.check_eval_config(cfg)
    else:
        with pytest.raises(ConfigError, match=match):
            monitor_mod.check_eval_config(cfg)


# --- in the training loop ----------------------------------------------------------------------------------------


CLIP_TINY = str(ROOT / "configs" / "clip_tiny.yaml")


@pytest.mark.slow
def test_two_tower_eval_in_the_loop_leaves_training_identical(tmp_path, monkeypatch):
    """clip_tiny on emoji pairs, eval on vs off: the same losses; the eval rows at steps 2, 4 and the last (5)
    hold every score, and the similarity picture is written for each."""
    import pretrain.objectives.contrastive  # noqa: F401  (registers clip, should pretrain.objectives not yet)
    from pretrain.train import main

    monkeypatch.chdir(tmp_path)  # the pairs are converted under ./data
    common = ["train.max_steps=5", "data.max_samples=64", "checkpoint.interval=100", "run.progress=false"]
    common += ["train.micro_batch_size=8", "eval.test_samples=40", "eval.batch_size=16"]

    def run(name, *extra):
        args = [CLIP_TINY]
        for o in (f"run.output_dir={tmp_path / name}", *common, *extra):
            args += ["--set", o]
        assert main(args) == 0
        return read_metrics(tmp_path / name)

    off, on = run("off"), run("on", "eval.interval=2")
    assert [r["loss"] for r in on] == [r["loss"] for r in off] and len(on) == 5
    evals = {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in on}
    assert sorted(s for s, row in evals.items() if row) == [2, 4, 5]
    keys = ["zeroshot_top1", "zeroshot_top5", *(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))]
    for step in (2, 4, 5):
        assert sorted(evals[step]) == sorted(
            [f"eval/{k}" for k in keys] + ["eval/time_s", "eval/time_fraction"]
        )
        assert all(0 <= evals[step][f"eval/{k}"] <= 1 for k in keys)
        assert evals[step]["eval/i2t_R@1"] <= evals[step]["eval/i2t_R@5"] <= evals[step]["eval/i2t_R@10"]
        assert (tmp_path / "on" / "images" / f"eval_similarity_step{step:08d}.png").is_file()
    assert not list((tmp_path / "off").glob("images/eval_*"))


# --- for the end-to-end runs ---------------------------------------------------------------------------------


def train_two_ranks(cwd, config: str, *overrides: str, timeout: int = 300):
    """`python -m pretrain.train CONFIG --set ...` on 2 gloo ranks (torchrun) in `cwd`, one thread per rank;
    fails the test with the output on a non-zero exit, and on a hang after `timeout` seconds. Returns the
    CompletedProcess. The 2-rank no-hang test of the two-tower monitor (at the last step and after a resume)
    drives it, e.g. train_two_ranks(tmp, CLIP_TINY, "run.output_dir=...", "eval.interval=4")."""
    from tests.test_monitor import run_in

    args = [config]
    for o in ("run.progress=false", *overrides):
        args += ["--set", o]
    return run_in(cwd, 2, args, timeout=timeout)
