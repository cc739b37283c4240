"""Text runs after training: the CLI export loads in a fresh Python that imports nothing of Tessera
(AutoTokenizer, AutoModelForCausalLM / AutoModelForMaskedLM, pipelines) and computes what Tessera computes; the
model card names the run's numbers; `python -m pretrain.text_eval` reports held-out perplexity next to a
unigram baseline recomputed here from the token counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain import export, text_eval
from pretrain.data.tokenizer import load_tokenizer, tokenizer_info
from pretrain.train import main
from tests.conftest import read_metrics
from tests.test_export_pipelines import fresh_python
from tests.test_text_train import CLM, MLM, convert_wordnet, text_args

pytestmark = pytest.mark.usefixtures("hf_offline")
SENTENCE = "a small domesticated carnivorous mammal with soft fur, a short snout and retractile claws"
PROMPT = "the act of"
NEW_TOKENS = 12


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One thread here and in the fresh interpreters (two shared cores: see tests/test_text_train.py)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{"clm"|"mlm": (run dir, export dir)}: the tiny configs trained 20 steps, exported with the CLI."""
    root = tmp_path_factory.mktemp("text_export")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        shards = convert_wordnet(root / "wordnet")
        for name, config in (("clm", CLM), ("mlm", MLM)):
            run, hf = root / f"{name}_run", root / f"{name}_hf"
            assert main(text_args(config, run, shards, "run.tensorboard=false")) == 0
            assert export.main([str(run), str(hf)]) == 0
            out[name] = run, hf
    torch.set_num_threads(before)
    return out


def tessera_tokenizer(run: Path):
    """The run's own tokenizer (tokenizers.Tokenizer, as the converter used it)."""
    _, _, cfg = export.load_checkpoint_model(run, with_config=True)
    return load_tokenizer(tokenizer_info(cfg.data).path)


def check_card(run: Path, hf: Path, arch: str, objective: str, task: str) -> None:
    card = (hf / "README.md").read_text()
    last = read_metrics(run)[-1]
    assert last["step"] == 20 and last["samples_seen"] == 160
    assert f"pipeline_tag: {task}" in card
    assert f"| final loss | {last['loss']:.4f} at step 20 |" in card
    assert "20 optimizer steps, 160 rows = 20,480 token slots seen, 1 rank(s)" in card
    assert f"({arch})" in card and f"`{objective}`" in card and "`wordnet`" in card
    assert "packed rows of 128 tokens" in card and "vocabulary 512 ids" in card
    meta = json.loads((hf / "tessera.json").read_text())
    assert meta["step"] == 20 and meta["samples_seen"] == 160 and meta["loss"] == last["loss"]


def test_clm_export_loads_generates_and_matches_tessera(exported, tmp_path):
    run, hf = exported["clm"]
    theirs = fresh_python(
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline\n"
        f"out = {str(hf)!r}\n"
        "tok = AutoTokenizer.from_pretrained(out)\n"
        "model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)\n"
        f"ids = tok({SENTENCE!r}).input_ids\n"
        "with torch.no_grad():\n"
        "    logits = model.eval()(torch.tensor([ids])).logits\n"
        "generate = pipeline('text-generation', model=out)\n"
        f"kw = dict(max_new_tokens={NEW_TOKENS}, do_sample=False)\n"
        f"gen_ids = generate({PROMPT!r}, return_tensors=True, **kw)[0]['generated_token_ids']\n"
        f"gen_text = generate({PROMPT!r}, **kw)[0]['generated_text']\n"
        "print(json.dumps({'class': type(model).__name__, 'info': info, 'ids': ids, 'logits': logits.tolist(),\n"
        f"    'prompt': tok({PROMPT!r}).input_ids, 'gen_ids': gen_ids, 'gen_text': gen_text}}))",
        tmp_path,
    )
    assert theirs["class"] == "LlamaForCausalLM"
    assert not any(theirs["info"].values()), theirs["info"]  # no missing / unexpected / mismatched keys
    tok = tessera_tokenizer(run)
    # the exported tokenizer encodes as the converter did (no special tokens added: documents had none)
    assert theirs["ids"] == tok.encode(SENTENCE, add_special_tokens=False).ids
    assert theirs["prompt"] == tok.encode(PROMPT, add_special_tokens=False).ids
    model, _ = export.load_checkpoint_model(run)
    decoder = model.backbone
    with torch.no_grad():
        ours = decoder(torch.tensor([theirs["ids"]]))
    torch.testing.assert_close(torch.tensor(theirs["logits"]), ours, atol=1e-4, rtol=0)
    # greedy decoding with Tessera's model: argmax of the last position, appended, until EOS or NEW_TOKENS
    ids = list(theirs["prompt"])
    eos = tokenizer_info(export.load_checkpoint_model(run, with_config=True)[2].data).eos_id
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            nxt = int(decoder(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos:
                break
    assert theirs["gen_ids"] == ids
    assert theirs["gen_text"] == tok.decode(ids, skip_special_tokens=True)
    check_card(run, hf, "LlamaForCausalLM", "clm", "text-generation")


def test_mlm_export_loads_fills_masks_and_matches_tessera(exported, tmp_path):
    run, hf = exported["mlm"]
    theirs = fresh_python(
        "import json, torch\n"
        "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline\n"
        f"out = {str(hf)!r}\n"
        "tok = AutoTokenizer.from_pretrained(out)\n"
        "model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)\n"
        f"ids = tok({SENTENCE!r}).input_ids\n"
        "with torch.no_grad():\n"
        "    logits = model.eval()(torch.tensor([ids])).logits\n"
        "text = f'a {tok.mask_token} of the'\n"
        "fill = pipeline('fill-mask', model=out)\n"
        "print(json.dumps({'class': type(model).__name__, 'info': info, 'ids': ids, 'logits': logits.tolist(),\n"
        "    'mask': tok.mask_token, 'masked': tok(text).input_ids, 'fill': fill(text, top_k=5)}))",
        tmp_path,
    )
    assert theirs["class"] == "ModernBertForMaskedLM" and theirs["mask"] == "<mask>"
    assert not any(theirs["info"].values()), theirs["info"]
    tok = tessera_tokenizer(run)
    assert theirs["ids"] == tok.encode(SENTENCE, add_special_tokens=False).ids
    assert theirs["masked"] == tok.encode("a <mask> of the", add_special_tokens=False).ids
    model, _ = export.load_checkpoint_model(run)
    encoder = model.backbone
    with torch.no_grad():
        ours = encoder(torch.tensor([theirs["ids"]]))
        masked = encoder(torch.tensor([theirs["masked"]]))[0]  # (N, V)
    torch.testing.assert_close(torch.tensor(theirs["logits"]), ours, atol=1e-4, rtol=0)
    at = theirs["masked"].index(model.mask_id)
    probs = masked[at].softmax(-1)
    top = theirs["fill"][0]
    assert top["token"] == int(masked[at].argmax())  # the pipeline's best token is Tessera's argmax
    for cand in theirs["fill"]:
        assert cand["score"] == pytest.approx(probs[cand["token"]].item(), abs=1e-5)
    assert [c["token"] for c in theirs["fill"]] == probs.topk(5).indices.tolist()
    check_card(run, hf, "ModernBertForMaskedLM", "mlm", "fill-mask")


# ---------------------------------------------------------------------------------------------- text_eval


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    """Working directory of the evals: the held-out split is converted under its data/shards on first use."""
    return tmp_path_factory.mktemp("text_eval")


def run_eval(run: Path, cwd: Path, monkeypatch) -> dict:
    monkeypatch.chdir(cwd)
    out = cwd / f"{run.name}.json"
    assert text_eval.main([str(run), "--max-rows", "20", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_text_eval_clm_against_an_independent_unigram(exported, eval_dir, monkeypatch, capsys):
    from pretrain.data.tokens import load_token_split, token_counts

    run, _ = exported["clm"]
    r = run_eval(run, eval_dir, monkeypatch)
    assert "unigram perplexity" in capsys.readouterr().out
    assert (r["objective"], r["split"], r["rows"], r["step"]) == ("clm", "test", 20, 20)
    model, _, cfg = export.load_checkpoint_model(run, with_config=True)
    # the same 20 packed rows of the held-out split (converted by the eval under eval_dir) and train counts
    rows = load_token_split(cfg.data, "test", 128, 20)
    counts = token_counts(cfg.data, "train", max_samples=2000).double()
    assert rows["input_ids"].shape == (20, 128) and int(counts.sum()) == 90775  # the train shards' tokens
    ids, doc = rows["input_ids"].numpy(), rows["doc_ids"].numpy()
    bos = tokenizer_info(cfg.data).bos_id
    # counted targets: the next token of the same document (never padding, never across documents or BOS)
    src_r, src_c, targets = [], [], []
    for i in range(ids.shape[0]):
        for j in range(ids.shape[1] - 1):
            if doc[i, j] >= 0 and doc[i, j + 1] == doc[i, j] and ids[i, j + 1] != bos:
                src_r.append(i)
                src_c.append(j)
                targets.append(int(ids[i, j + 1]))
    assert r["targets"] == len(targets) > 1000
    p = (counts.numpy() + 1) / (counts.sum().item() + 512)  # add-one smoothed over the model's 512 ids
    unigram = math.exp(float(np.mean(-np.log(p[targets]))))
    assert r["unigram_perplexity"] == pytest.approx(unigram, rel=1e-5)
    with torch.no_grad():
        logp = model.backbone(rows["input_ids"], rows["positions"], rows["doc_ids"]).log_softmax(-1)
    picked = logp[src_r, src_c]  # (T, V)
    t = torch.tensor(targets)
    nll = -picked.gather(1, t[:, None]).double().mean().item()
    assert r["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    assert r["accuracy"] == pytest.approx((picked.argmax(-1) == t).double().mean().item(), abs=1e-9)
    assert r["perplexity_reduction"] == pytest.approx(1 - r["perplexity"] / r["unigram_perplexity"])
    assert 1 < r["perplexity"] < 512 and 1 < r["unigram_perplexity"] < 512


def test_text_eval_mlm(exported, eval_dir, monkeypatch):
    from pretrain.data.tokens import load_token_split, token_counts

    run, _ = exported["mlm"]
    r = run_eval(run, eval_dir, monkeypatch)
    assert (r["objective"], r["split"], r["rows"], r["step"]) == ("mlm", "test", 20, 20)
    _, _, cfg = export.load_checkpoint_model(run, with_config=True)
    rows = load_token_split(cfg.data, "test", 128, 20)
    info = tokenizer_info(cfg.data)
    eligible = (rows["doc_ids"] >= 0) & ~torch.isin(rows["input_ids"], torch.tensor(info.special_ids))
    assert 0.25 * eligible.sum() < r["targets"] < 0.35 * eligible.sum()  # mask_prob 0.3 of the eligible
    counts = token_counts(cfg.data, "train", max_samples=2000)
    counts[list(info.special_ids)] = -1  # the baseline predicts the most frequent *regular* token
    assert r["most_frequent_token"] == int(counts.argmax())
    for key in ("accuracy", "most_frequent_accuracy"):
        assert 0 <= r[key] <= 1 and r[key] * r["targets"] == pytest.approx(round(r[key] * r["targets"]))
    assert 1 < r["perplexity"] < 10 * 512 and 1 < r["unigram_perplexity"] < 512


@pytest.mark.parametrize("kwargs", ["{linear_attn: gla, softmax_every: 2}", "{sliding_window: 16}"])
def test_models_without_a_transformers_class_export_in_tesseras_layout(tmp_path, kwargs):
    """Linear attention (and a sliding window) have no transformers twin at these pins: the CLI writes the
    documented safetensors layout + the tokenizer, and from_hf builds the same model back."""
    shards = convert_wordnet(tmp_path / "wordnet")
    run, out = tmp_path / "run", tmp_path / "out"
    assert main(text_args(CLM, run, shards, f"model.kwargs={kwargs}", "train.max_steps=2")) == 0
    assert export.main([str(run), str(out)]) == 0
    spec = json.loads((out / export.TESSERA_LAYOUT).read_text())
    assert spec["class"] == "models.llama.LlamaDecoder" and "no Hugging Face export" in spec["no_hf_export"]
    assert not (out / "config.json").exists()  # nothing pretends to be a transformers folder
    model, _ = export.load_checkpoint_model(run)
    back = export.from_hf(out)
    ours = model.backbone.state_dict()
    assert back.state_dict().keys() == ours.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.items())
    ids = torch.randint(5, 512, (1, 40))
    assert torch.equal(back(ids), model.backbone(ids))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("a dog")["input_ids"]  # the run's tokenizer is there
