"""The Llama decoder family: its transformers twin (LlamaForCausalLM parity, import, export refusals), packed rows
against their documents run alone, document leakage, linear-attention and hybrid layers, sizes and init
(the generic contract is tests/test_text_models.py)."""

import pytest
import torch
import torch.nn.functional as F

import models.llama
import models.text_layers
from models import create_model
from models.hf import adapter_for_arch, adapter_for_model
from models.llama import LlamaDecoder
from models.llama_hf import llama_config, state_to_hf
from ops.compat import import_transformers
from tests.conftest import trained_like

tf = import_transformers()
pytestmark = pytest.mark.usefixtures("hf_offline")
LENGTHS = [1, 7, 33, 100]  # documents of one packed row (research note 7B1)


def decoder(**kw) -> LlamaDecoder:
    torch.manual_seed(0)
    return trained_like(create_model("llama_test", **kw))


def random_ids(model, *shape, seed=0):
    return torch.randint(0, model.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def pack(docs: list[torch.Tensor], pad: int = 0):
    """One row from 1-D documents, plus `pad` padding tokens: ids, positions, doc_ids, each (1, N)."""
    ids = torch.cat([*docs, torch.zeros(pad, dtype=torch.long)])
    pos = torch.cat([*(torch.arange(len(d)) for d in docs), torch.zeros(pad, dtype=torch.long)])
    doc = torch.cat([*(torch.full((len(d),), i) for i, d in enumerate(docs)), torch.full((pad,), -1)])
    return ids[None], pos[None], doc[None]


def spans(docs):
    out, start = [], 0
    for d in docs:
        out.append(slice(start, start + len(d)))
        start += len(d)
    return out


def hf_from_folder(model, tmp_path, impl="sdpa"):
    """Export, save, load with transformers' own class: no missing or unexpected keys."""
    adapter_for_model(model).to_hf(model).save_pretrained(tmp_path)
    hf, info = tf.LlamaForCausalLM.from_pretrained(
        tmp_path, attn_implementation=impl, output_loading_info=True
    )
    assert not any(info.values()), info
    return hf.eval()


# --- transformers twin ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA and MHA
@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_llama_for_causal_lm(tmp_path, kv_heads, tie):
    model = decoder(num_kv_heads=kv_heads, tie_embeddings=tie)
    ids = random_ids(model, 2, 37)
    hf_from_folder(model, tmp_path)
    _, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        ours = model(ids)
        for impl in ("sdpa", "eager"):
            hf = tf.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=impl).eval()
            assert hf.config._attn_implementation == impl
            theirs = adapter_for_model(model).hf_outputs(hf, ids)["logits"]
            err = (theirs - ours).abs().max().item()
            assert err <= 1e-4, (impl, err)


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_is_bit_identical(tmp_path, tie):
    """Through the state dict, and through a saved folder (where transformers drops a tied lm_head)."""
    from safetensors.torch import load_file

    model = decoder(tie_embeddings=tie)
    adapter = adapter_for_model(model)
    hf = adapter.to_hf(model)
    back = adapter_for_arch("LlamaForCausalLM").from_hf(hf.state_dict(), hf.config)
    hf.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in saved) is not tie
    cfg = tf.AutoConfig.from_pretrained(tmp_path)
    again = adapter_for_arch(cfg.architectures[0]).from_hf(saved, cfg)
    for other in (back, again):
        assert other.hparams() == model.hparams()
        assert other.state_dict().keys() == model.state_dict().keys()
        for k, v in model.state_dict().items():
            assert torch.equal(other.state_dict()[k], v), k


def test_wrong_rope_layout_fails_parity():
    """q/k rows permuted into the interleaved-pair layout (torchtitan's native one) break the logits far beyond
    the 1e-4 bar: the parity check can tell the layouts apart."""
    model = decoder()
    hf = adapter_for_model(model).to_hf(model)
    hd = model.head_dim
    perm = torch.arange(hd).view(2, hd // 2).t().reshape(-1)  # rotate-half (i, i + hd/2) -> pairs (2i, 2i+1)
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj, heads in (
                (layer.self_attn.q_proj, model.num_heads),
                (layer.self_attn.k_proj, model.num_kv_heads),
            ):
                w = proj.weight.view(heads, hd, -1)
                proj.weight.copy_(w[:, perm].reshape(heads * hd, -1))
    ids = random_ids(model, 2, 37)
    with torch.no_grad():
        err = (hf(ids, use_cache=False).logits - model(ids)).abs().max().item()
    assert err > 1e-2, err


def test_packed_row_matches_hf_per_document():
    """Tessera on a packed row (doc_ids, restarting positions, trailing padding) == transformers run on each
    document alone (no reliance on HF's own packed-sequence detection)."""
    model = decoder()
    hf = adapter_for_model(model).to_hf(model)
    docs = [random_ids(model, n, seed=i) for i, n in enumerate(LENGTHS)]
    ids, pos, doc = pack(docs, pad=3)
    with torch.no_grad():
        ours = model(ids, pos, doc)[0]
        for d, s in zip(docs, spans(docs)):
            theirs = hf(d[None], use_cache=False).logits[0]
            assert (theirs - ours[s]).abs().max() <= 1e-4


def test_transformers_random_init_imports_back(tmp_path):
    """A folder transformers wrote from its own init (GQA, odd sizes) imports and computes the same logits."""
    from safetensors.torch import load_file

    for tie in (False, True):
        cfg = tf.LlamaConfig(
            vocab_size=300,
            hidden_size=48,
            intermediate_size=100,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rope_theta=1000.0,
            tie_word_embeddings=tie,
        )
        torch.manual_seed(0)
        hf = tf.LlamaForCausalLM(cfg).eval()
        folder = tmp_path / str(tie)
        hf.save_pretrained(folder)
        cfg = tf.AutoConfig.from_pretrained(folder)
        model = adapter_for_arch(cfg.architectures[0]).from_hf(
            load_file(str(folder / "model.safetensors")), cfg
        )
        assert model.hparams()["ffn_hidden"] == 100 and model.tie_embeddings is tie
        ids = torch.randint(0, 300, (2, 20))
        with torch.no_grad():
            assert (hf(ids, use_cache=False).logits - model(ids)).abs().max() <= 1e-4


def test_llama_model_without_head(tmp_path):
    """A LlamaModel imports when tied (the head is the embedding) and is refused untied (no head to import)."""
    for tie in (True, False):
        cfg = tf.LlamaConfig(
            vocab_size=200,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            tie_word_embeddings=tie,
        )
        torch.manual_seed(0)
        base = tf.LlamaModel(cfg).eval()
        adapter = adapter_for_arch("LlamaModel")
        if not tie:
            with pytest.raises(ValueError, match="LlamaConfig.tie_word_embeddings=False"):
                adapter.from_hf(base.state_dict(), cfg)
            continue
        model = adapter.from_hf(base.state_dict(), cfg)
        ids = torch.randint(0, 200, (1, 12))
        with torch.no_grad():
            feats = base(ids, use_cache=False).last_hidden_state
            torch.testing.assert_close(model.forward_features(ids), feats, atol=1e-5, rtol=0)
            torch.testing.assert_close(model(ids), feats @ base.embed_tokens.weight.T, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("attention_bias", True),
        ("mlp_bias", True),
        ("hidden_act", "gelu"),
        ("head_dim", 16),
        ("pretraining_tp", 2),
    ],
)
def test_import_refuses_what_tessera_cannot_express(field, value):
    cfg = tf.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    sd = tf.LlamaForCausalLM(cfg).state_dict()
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=f"LlamaConfig.{field}="):
        adapter_for_arch("LlamaForCausalLM").from_hf(sd, cfg)


def test_export_config_and_refusals():
    model = create_model("llama_test")
    cfg = llama_config(model)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (None, None, None)
    assert cfg.max_position_embeddings == 8192 and cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-5
    assert llama_config(model, bos_token_id=1, eos_token_id=2).eos_token_id == 2
    assert set(state_to_hf(model)) == set(tf.LlamaForCausalLM(cfg).state_dict())
    for kw, word in ((dict(linear_attn="gla"), "linear_attn"), (dict(sliding_window=8), "sliding_window")):
        with pytest.raises(ValueError, match=word):
            adapter_for_model(create_model("llama_test", **kw)).to_hf(create_model("llama_test", **kw))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_sliding_window_matches_mistral(impl):
    """The window against an independent reference: transformers' Mistral is Llama (same keys) plus a sliding
    window whose query sees its last `sliding_window` keys, itself included (rows longer than the window)."""
    model = decoder(sliding_window=8)
    h = model.hparams()
    cfg = tf.MistralConfig(
        vocab_size=h["vocab_size"],
        hidden_size=h["dim"],
        intermediate_size=h["ffn_hidden"],
        num_hidden_layers=h["depth"],
        num_attention_heads=h["num_heads"],
        num_key_value_heads=h["num_kv_heads"],
        head_dim=model.head_dim,
        rms_norm_eps=h["norm_eps"],
        rope_theta=h["rope_theta"],
        sliding_window=8,
        attn_implementation=impl,
    )
    hf = tf.MistralForCausalLM(cfg).eval()
    hf.load_state_dict(state_to_hf(model), strict=True)
    ids = random_ids(model, 2, 37)
    with torch.no_grad():
        err = (hf(ids, use_cache=False).logits - model(ids)).abs().max().item()
        full = (hf(ids, use_cache=False).logits - decoder()(ids)).abs().max().item()
    assert err <= 1e-4 and full > 1e-2, (err, full)


# --- packed rows ----------------------------------------------------------------------------------------
def doc_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy within one document: (L, V) logits, (L,) ids."""
    return F.cross_entropy(logits[:-1], ids[1:], reduction="sum")


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out


@pytest.mark.parametrize(
    "kw",
    [{}, {"sliding_window": 8}, {"linear_attn": "gla"}, {"linear_attn": "retention", "softmax_every": 2}],
    ids=["causal", "window8", "gla", "retention+softmax"],
)
def test_packed_row_equals_documents_alone(kw):
    """Per-document logits to 1e-5, the summed loss and every parameter gradient to 1e-5 relative."""
    model = decoder(**kw).train()
    docs = [random_ids(model, n, seed=i) for i, n in enumerate(LENGTHS)]
    ids, pos, doc = pack(docs, pad=3)
    logits = model(ids, pos, doc)[0]
    loss = sum(doc_loss(logits[s], d) for d, s in zip(docs, spans(docs)))
    loss.backward()
    g_packed = grads(model)
    alone_loss = 0.0
    for d, s in zip(docs, spans(docs)):
        alone = model(d[None])[0]
        torch.testing.assert_close(alone, logits[s].detach(), atol=1e-5, rtol=0)
        part = doc_loss(alone, d)
        part.backward()
        alone_loss += part.item()
    g_alone = grads(model)
    assert abs(loss.item() - alone_loss) <= 1e-5 * abs(alone_loss)
    for n, g in g_alone.items():
        rel = (g_packed[n] - g).norm() / g.norm()
        assert g.norm() > 0 and rel <= 1e-5, (n, rel.item())


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 8}, {"linear_attn": "none", "softmax_every": 2}])
def test_leakage_probe(kw):
    """Perturbing document A changes A's logits and leaves document B's (before and after it) unchanged."""
    model = decoder(**kw)
    docs = [random_ids(model, n, seed=i) for i, n in enumerate([20, 30, 25])]
    ids, pos, doc = pack(docs)
    changed = ids.clone()
    changed[0, 20:50] = random_ids(model, 30, seed=9)
    with torch.no_grad():
        a, b = model(ids, pos, doc)[0], model(changed, pos, doc)[0]
    assert (a[20:50] - b[20:50]).abs().max() > 1e-2
    assert (a[:20] - b[:20]).abs().max() <= 1e-6 and (a[50:] - b[50:]).abs().max() <= 1e-6


@pytest.mark.parametrize("mode", ["none", "retention", "gla"])
@pytest.mark.parametrize("softmax_every", [0, 2])
def test_linear_and_hybrid_layers(mode, softmax_every):
    """Which layers are softmax; forward/backward with doc_ids; each document equal to it run alone."""
    model = decoder(depth=4, linear_attn=mode, softmax_every=softmax_every).train()
    kinds = [type(b.attn).__name__ for b in model.blocks]
    expect = [
        "CausalSelfAttention" if softmax_every and i % 2 == 1 else "LinearSelfAttention" for i in range(4)
    ]
    assert kinds == expect
    assert model.softmax_layers == [i for i, k in enumerate(expect) if k == "CausalSelfAttention"]
    docs = [random_ids(model, n, seed=i) for i, n in enumerate([9, 70, 21])]
    ids, pos, doc = pack(docs)
    logits = model(ids, pos, doc)[0]
    logits.square().mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    with torch.no_grad():
        for d, s in zip(docs, spans(docs)):
            torch.testing.assert_close(model(d[None])[0], logits[s].detach(), atol=1e-5, rtol=0)
        out = model.to(torch.bfloat16)(ids, pos, doc)[0].float()  # bf16 within rounding of fp32
    assert torch.isfinite(out).all()
    assert F.cosine_similarity(out.flatten(), logits.detach().flatten(), dim=0) > 0.99


# --- the family ---------------------------------------------------------------------------------------------
def test_grad_checkpointing_wraps_every_block(monkeypatch):
    calls = []

    def counting(fn, *args, **kw):
        calls.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kw)

    monkeypatch.setattr(models.text_layers, "checkpoint", counting)
    model = decoder(depth=3).train()
    model.set_grad_checkpointing(True)
    model(random_ids(model, 1, 10)).sum().backward()
    assert calls == list(model.blocks)


def test_bad_arguments_name_themselves():
    for kw, word in [
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(linear_attn="mamba"), "linear_attn"),
        (dict(softmax_every=2), "softmax_every"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(dim=60), "num_heads"),
    ]:
        with pytest.raises(ValueError, match=word):
            create_model("llama_test", **kw)
    model = create_model("llama_test", max_seq_len=8)
    ids = torch.zeros(1, 9, dtype=torch.long)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(ids)
    with pytest.raises(ValueError, match="doc_ids"):
        model(ids[:, :4], doc_ids=torch.zeros(1, 5, dtype=torch.long))


def test_init_scales_output_projections():
    """N(0, 0.02) weights, residual output projections N(0, 0.02 / sqrt(2 depth)), unit norms."""
    torch.manual_seed(0)
    model = LlamaDecoder(vocab_size=1000, dim=256, depth=8, num_heads=4)
    out_std = 0.02 / 4  # sqrt(2 * 8) = 4
    for name, p in model.named_parameters():
        want = 1.0 if p.ndim == 1 else out_std if name.endswith(("o_proj.weight", "w2.weight")) else 0.02
        got = p.float().std().item() if p.ndim > 1 else p.mean().item()
        assert abs(got - want) < 0.05 * want, (name, got, want)


@pytest.mark.parametrize("name", ["llama_125m", "llama_350m", "llama_760m", "llama_1b"])
def test_sizes_count_like_transformers(name):
    """Each size's parameter count equals its LlamaForCausalLM twin's (both built on the meta device)."""
    with torch.device("meta"):
        model = create_model(name)
        hf = tf.LlamaForCausalLM(llama_config(model))
    ours = sum(p.numel() for p in model.parameters())
    assert ours == sum(p.numel() for p in hf.parameters())
    assert model.num_kv_heads == model.num_heads and model.vocab_size == 32000
