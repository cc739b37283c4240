"""ModernBERT encoder (models/modernbert.py) and its ModernBertForMaskedLM twin (models/modernbert_hf.py): logits
parity with transformers 4.57.6 (sdpa and eager), import/export round trips, packed rows equal separate runs
with no leakage between documents, and the errors for bad inputs and configs Tessera cannot express."""

import re

import pytest
import torch
import torch.nn.functional as F

import models.modernbert
from models import create_model
from models.modernbert import ModernBert
from models.modernbert_hf import modernbert_from_hf, modernbert_hf_outputs, modernbert_to_hf
from ops.compat import import_transformers
from pretrain import export
from pretrain.optim import layer_ids
from tests.conftest import trained_like

tf = import_transformers()
VOCAB = 512
SEQ = 80  # longer than modernbert_test's local_attention (16): the window matters


def tiny(seed: int = 0, **kw) -> ModernBert:
    """modernbert_test (4 layers: 0 and 3 global, 1 and 2 local) with every weight moved off its init."""
    torch.manual_seed(seed)
    return trained_like(create_model("modernbert_test", **kw), seed=seed + 1)


def ids(b: int = 2, n: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- parity with transformers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_logits_match_transformers(model, impl):
    assert {layer.is_global for layer in model.layers} == {True, False}
    hf = modernbert_to_hf(model, attn_implementation=impl)
    assert hf.config._attn_implementation == impl
    x = ids()
    with torch.no_grad():
        theirs = modernbert_hf_outputs(hf, x)
        feats = model.forward_features(x)
        assert max_diff(theirs["features"], feats) <= 1e-4
        assert max_diff(theirs["logits"], model.forward_head(feats)) <= 1e-4
        # the comparison sees the window: without it the local layers compute something else
        windows = [layer.attn.window for layer in model.layers]
        try:
            for layer in model.layers:
                layer.attn.window = None
            assert max_diff(theirs["logits"], model(x)) > 1e-2
        finally:
            for layer, w in zip(model.layers, windows):
                layer.attn.window = w


def interleaved_rope(x, cos, sin):
    """RoPE on adjacent pairs (2i, 2i + 1) (GPT-J's layout) with the same angles: the wrong layout."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)
    rot = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return (x.float() * c + rot.float() * s).to(x.dtype)


def test_parity_fails_with_a_wrong_rope_layout_or_swapped_thetas(model, monkeypatch):
    hf = modernbert_to_hf(model)
    x = ids()
    with torch.no_grad():
        theirs = modernbert_hf_outputs(hf, x)["logits"]
        assert max_diff(theirs, model(x)) <= 1e-4
        with monkeypatch.context() as m:
            m.setattr(models.modernbert, "apply_rope", interleaved_rope)
            assert max_diff(theirs, model(x)) > 1e-3
        swapped = ModernBert(
            **{**model.hparams(), "global_rope_theta": 10000.0, "local_rope_theta": 160000.0}
        )
        swapped.load_state_dict(model.state_dict())
        assert max_diff(theirs, swapped.eval()(x)) > 1e-3


def test_round_trip_and_save_pretrained(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = modernbert_to_hf(model)
    back = modernbert_from_hf(hf.state_dict(), hf.config)
    assert back.hparams() == model.hparams()
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    hf.save_pretrained(tmp_path)
    loaded, info = tf.AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is tf.ModernBertForMaskedLM
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert loaded.decoder.weight.data_ptr() == loaded.model.embeddings.tok_embeddings.weight.data_ptr()
    x = ids(b=1)
    with torch.no_grad():
        assert max_diff(modernbert_hf_outputs(loaded.eval(), x)["logits"], model(x)) <= 1e-4
    imported = export.from_hf(tmp_path)  # the folder transformers wrote (tied decoder left out of the file)
    assert all(torch.equal(ours[k], v) for k, v in imported.state_dict().items())


@pytest.mark.parametrize(
    "cfg",
    [
        {},  # ModernBERT's defaults: no biases but the decoder's
        dict(norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True, local_rope_theta=None),
        dict(decoder_bias=False, local_attention=15, global_attn_every_n_layers=2, norm_eps=1e-6),
    ],
)
def test_import_of_a_folder_transformers_wrote(tmp_path, monkeypatch, cfg):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=2,
        local_attention=16,
        max_position_embeddings=256,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    )
    torch.manual_seed(0)
    hf = trained_like(tf.ModernBertForMaskedLM(tf.ModernBertConfig(**{**base, **cfg})))
    hf.save_pretrained(tmp_path)
    ours = export.from_hf(tmp_path)
    assert isinstance(ours, ModernBert)
    h = ours.hparams()
    assert (h["pad_token_id"], h["cls_token_id"], h["max_seq_len"]) == (3, 1, 256)
    x = ids(n=60)
    with torch.no_grad():
        assert max_diff(modernbert_hf_outputs(hf, x)["logits"], ours(x)) <= 1e-4


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_activation", "silu"),
        ("classifier_activation", "gelu_new"),
        ("tie_word_embeddings", False),
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("global_attn_every_n_layers", 0),
        ("pad_token_id", 9999),
    ],
)
def test_a_config_tessera_cannot_express_is_refused_by_name(model, field, value):
    hf = modernbert_to_hf(model)
    cfg = tf.ModernBertConfig(**{**hf.config.to_dict(), field: value})
    with pytest.raises(ValueError, match=re.escape(f"ModernBertConfig.{field}={value!r}")):
        modernbert_from_hf(hf.state_dict(), cfg)


# --- packed rows ------------------------------------------------------------------------------------------
LENGTHS = (1, 7, 33, 100)  # 33 and 100 are longer than the local window


def packed(lengths=LENGTHS, pad: int = 4, seed: int = 0):
    """One row of documents (random ids) followed by `pad` padding tokens: (ids, positions, doc_ids)."""
    x = ids(b=1, n=sum(lengths) + pad, seed=seed)
    pos = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(pad, dtype=torch.long)])
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)])
    return x, pos[None], doc[None]


def spans(lengths=LENGTHS):
    starts = torch.tensor((0, *lengths)).cumsum(0).tolist()
    return [slice(a, a + n) for a, n in zip(starts, lengths)]


def test_packed_row_equals_separate_documents_logits_loss_and_grads():
    model = tiny().train()  # no dropout: train() only checks nothing depends on the mode
    x, pos, doc = packed()
    labels = torch.randint(0, VOCAB, x.shape, generator=torch.Generator().manual_seed(1))

    logits = model(x, pos, doc)  # (1, N, V)
    loss = sum(F.cross_entropy(logits[0, s], labels[0, s], reduction="sum") for s in spans())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    per_doc, sep_loss = [], 0.0
    for s in spans():
        out = model(x[:, s])  # alone in its row: positions 0.., one document
        per_doc.append(out)
        sep_loss = sep_loss + F.cross_entropy(out[0], labels[0, s], reduction="sum")
    sep_loss.backward()

    for s, out in zip(spans(), per_doc):
        assert max_diff(logits[:, s], out) <= 1e-5
    assert abs(loss.item() - sep_loss.item()) <= 1e-5 * abs(sep_loss.item())
    for n, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        assert scale > 0, n
        assert max_diff(grads[n], p.grad) <= 1e-5 * scale, n

    # and each document equals transformers' own run on it
    hf = modernbert_to_hf(model)
    with torch.no_grad():
        for s in spans():
            assert max_diff(modernbert_hf_outputs(hf, x[:, s])["logits"], logits[:, s]) <= 1e-4


def test_no_leakage_between_documents():
    model = tiny()
    x, pos, doc = packed()
    a, b = spans()[2], spans()[3]  # neighbours within a window's reach of each other
    x2 = x.clone()
    x2[0, a] = (x2[0, a] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(x, pos, doc), model(x2, pos, doc)
    assert max_diff(before[:, a], after[:, a]) > 1e-2  # the probe changes its own document
    assert max_diff(before[:, b], after[:, b]) <= 1e-6
    assert max_diff(before[:, : a.start], after[:, : a.start]) <= 1e-6


# --- contract details and errors --------------------------------------------------------------------------
def test_row_longer_than_max_seq_len_is_an_error():
    model = ModernBert(
        vocab_size=64, embed_dim=32, depth=2, num_heads=2, intermediate_size=32, max_seq_len=32
    )
    model(torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="doc_ids"):
        model(torch.zeros(1, 8, dtype=torch.long), doc_ids=torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="pad_token_id=64"):
        ModernBert(vocab_size=64, embed_dim=32, depth=1, num_heads=2, pad_token_id=64)


def test_grad_checkpointing_is_identical_and_init_is_seeded():
    x, pos, doc = packed(lengths=(20, 30), pad=2)
    runs = []
    for ckpt in (False, True):
        model = tiny().train()
        model.set_grad_checkpointing(ckpt)
        model(x, pos, doc).square().mean().backward()
        runs.append({n: p.grad for n, p in model.named_parameters()})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])

    def fresh(seed):
        torch.manual_seed(seed)
        return ModernBert(**create_model("modernbert_test").hparams()).state_dict()

    a, b, c = fresh(0), fresh(0), fresh(1)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(
        a["layers.1.attn.qkv.weight"], c["layers.1.attn.qkv.weight"]
    )
    # ModernBERT's scheme: truncated at 2 std; output projections scaled by 1 / sqrt(2 * depth)
    assert a["tok_embeddings.weight"].abs().max() <= 2 * 0.02
    assert a["layers.0.attn.proj.weight"].abs().max() <= 2 * 0.02 / (2 * 4) ** 0.5
    assert 0.015 < a["layers.0.mlp.wi.weight"].std() < 0.02


def test_group_matcher_orders_every_parameter():
    model = create_model("modernbert_test", depth=3)
    depth = layer_ids(model)
    assert depth["tok_embeddings.weight"] == 0 and depth["emb_norm.weight"] == 0
    assert [depth[f"layers.{i}.mlp.wo.weight"] for i in range(3)] == [1, 2, 3]
    assert depth["final_norm.weight"] == depth["head.dense.weight"] == depth["head.bias"] == 4
