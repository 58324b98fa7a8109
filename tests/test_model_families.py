"""Every peft LoRA model a user brings: each model family's curvature against a from-scratch oracle
(its own loss, its own token masks), GPT-2's Conv1D, packed batches, float64 models, adapter
switching, and what is refused or warned about."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from bruteforce import base_factors
from peft import LoraConfig, get_peft_model
from problems import closed_sum_on_model

from lalora_kernels import LaLoRARegularizer, LaplacePenalty, UncoveredParametersWarning, estimate_curvature
from lalora_kernels.lora_layers import find_lora_layers

V = 40
CROSS = ("encoder_attn.k_proj", "encoder_attn.v_proj", "EncDecAttention.k", "EncDecAttention.v")


def _padded(bsz, seq, seed, pad_to=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (bsz, seq), generator=g)
    lengths = torch.randint(2, seq + 1, (bsz,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    return ids, mask


def _lora(base, targets, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # GPT-2: peft sets fan_in_fan_out=True and says so
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=targets, **kw))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model


# ---- families: (model, batches, the oracle's loss and masks, which stream each layer reads) -------
def bart(seq_dec):
    from transformers import BartConfig, BartForConditionalGeneration
    from transformers.models.bart.modeling_bart import shift_tokens_right
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32,
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    model = _lora(BartForConditionalGeneration(cfg).double(), ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    data = []
    for k in range(2):
        ids, mask = _padded(3, 6, k)
        labels, lmask = _padded(3, seq_dec, 10 + k)
        data.append({"input_ids": ids, "attention_mask": mask, "labels": labels.masked_fill(lmask == 0, -100)})

    def loss_of(m, b):
        dec = shift_tokens_right(b["labels"], cfg.pad_token_id, cfg.decoder_start_token_id)
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=dec).logits
        return (F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100, reduction="sum"),
                {"encoder": b["attention_mask"], "decoder": b["labels"] != -100})
    return model, data, loss_of, lambda n: "encoder" if ".encoder." in n or any(c in n for c in CROSS) else "decoder"


def t5():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2, dropout_rate=0.0,
                   decoder_start_token_id=0)
    model = _lora(T5ForConditionalGeneration(cfg).double(), ["q", "k", "v", "o", "wi", "wo"])
    data = []
    for k in range(2):
        ids, mask = _padded(3, 5, k)
        labels, lmask = _padded(3, 7, 20 + k)
        data.append({"input_ids": ids, "attention_mask": mask, "labels": labels.masked_fill(lmask == 0, -100)})

    def loss_of(m, b):
        dec = m.get_base_model()._shift_right(b["labels"])
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=dec).logits
        return (F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100, reduction="sum"),
                {"encoder": b["attention_mask"], "decoder": b["labels"] != -100})
    return model, data, loss_of, lambda n: "encoder" if ".encoder." in n or any(c in n for c in CROSS) else "decoder"


def bert_classifier(num_labels):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                     num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = _lora(BertForSequenceClassification(cfg).double(), ["query", "key", "value", "dense"])
    data = []
    for k in range(2):
        ids, mask = _padded(4, 6, k)
        g = torch.Generator().manual_seed(30 + k)
        y = torch.randn(4, generator=g).double() if num_labels == 1 else torch.randint(0, num_labels, (4,), generator=g)
        data.append({"input_ids": ids, "attention_mask": mask, "labels": y})

    def loss_of(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = 0.5 * (logits.squeeze(-1) - b["labels"]).square().sum() if num_labels == 1 else \
            F.cross_entropy(logits, b["labels"], reduction="sum")
        return loss, {"encoder": b["attention_mask"], "example": torch.ones(logits.shape[0])}
    return model, data, loss_of, lambda n: "example" if "pooler" in n else "encoder"


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    model = _lora(GPT2LMHeadModel(cfg).double(), ["c_attn", "c_proj", "c_fc"])
    data = []
    for k in range(2):
        ids, mask = _padded(3, 7, k)
        data.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return model, data, _causal_loss, lambda n: "encoder"


def _causal_loss(m, b):
    logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    return (F.cross_entropy(logits.flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"),
            {"encoder": b["attention_mask"]})


FAMILIES = {"bart": lambda: bart(7), "bart, equal lengths": lambda: bart(6), "t5": t5,
            "bert classifier": lambda: bert_classifier(3), "bert regression": lambda: bert_classifier(1),
            "gpt2 (Conv1D)": gpt2}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_s_curvature_is_its_own_loss_s(family):
    model, data, loss_of, stream_of = FAMILIES[family]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curv = estimate_curvature(model, data, variant="wkfac", progress=False, storage="dense")
    ref = base_factors(model, data, loss_of, stream_of)
    assert set(curv.adapters) == set(ref)
    for name, f in ref.items():
        torch.testing.assert_close(curv.sx(name), f["Sx"], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(curv.dense(f"Sg/{name}"), f["Sg"], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("variant", ["diag", "kfac", "tri", "wkfac"])
def test_every_variant_runs_on_gpt2_and_its_penalty_is_the_closed_form(variant, backend):
    model, data, *_ = gpt2()
    model.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curv = estimate_curvature(model, data, variant=variant, progress=False)
    reg = LaLoRARegularizer(curv, lam=1.0, normalize=None)
    refs = find_lora_layers(model)
    with torch.no_grad():
        for r in refs:
            r.A.add_(0.1 * torch.randn_like(r.A))
            r.B.add_(0.1 * torch.randn_like(r.B))
    value = reg(model)
    total, _ = closed_sum_on_model(curv, refs, variant, lam=1.0, dtype=torch.float64)
    torch.testing.assert_close(value.double(), torch.as_tensor(total).double(), rtol=1e-4, atol=1e-7)


def test_float64_models_get_float64_factors():
    """The loss of a float64 model is differentiated in float64 (fp32 logits cost 1e-7)."""
    model, data, loss_of, stream_of = gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curv = estimate_curvature(model, data, variant="wkfac", progress=False, storage="dense")
    ref = base_factors(model, data, loss_of, stream_of)
    for name, f in ref.items():
        assert curv.dense(f"Sg/{name}").dtype == torch.float64
        torch.testing.assert_close(curv.dense(f"Sg/{name}"), f["Sg"], rtol=1e-12, atol=1e-15)


def test_packed_batches_equal_their_sequences_one_by_one():
    """A padding-free batch (DataCollatorWithFlattening: one row, position_ids restarting, -100 at each
    sequence's first label) gives the curvature of its sequences run separately."""
    from problems import tiny_llama
    model = tiny_llama()
    seqs = [torch.randint(0, 37, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 7, 4)]
    separate = [{"input_ids": s[None], "labels": s[None].clone()} for s in seqs]
    labels = torch.cat([torch.cat([torch.tensor([-100]), s[1:]]) for s in seqs])
    packed = [{"input_ids": torch.cat(seqs)[None], "labels": labels[None],
               "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = estimate_curvature(model, separate, variant="wkfac", progress=False, storage="dense")
        b = estimate_curvature(model, packed, variant="wkfac", progress=False, storage="dense")
    assert a.num_tokens == b.num_tokens == 16
    for k, t in a.tensors.items():
        torch.testing.assert_close(b.tensors[k], t, rtol=1e-10, atol=1e-13)


def _two_adapters(fewer=False):
    from problems import tiny_llama
    model = tiny_llama(targets=["q_proj", "v_proj", "down_proj"])
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"] if fewer else
                                      ["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.b" in n:
                p.normal_(0, 0.3)
    return model


def test_switching_adapters_is_refused_or_switches_curvatures():
    from problems import batches
    model = _two_adapters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c_default = estimate_curvature(model, batches(), variant="wkfac", progress=False)
        model.set_adapter("b")
        c_b = estimate_curvature(model, batches(), variant="wkfac", progress=False)
    assert (c_default.adapter_name, c_b.adapter_name) == ("default", "b")
    model.set_adapter("default")
    only = LaLoRARegularizer(c_default, lam=1.0)
    only(model)
    model.set_adapter("b")
    with pytest.raises(ValueError, match="active adapter is 'b' but this regulariser's curvature was estimated on "
                                         r"\['default'\]"):
        only(model)
    both = LaLoRARegularizer({"default": c_default, "b": c_b}, lam=1.0)
    for name, curv in (("b", c_b), ("default", c_default)):
        model.set_adapter(name)
        refs = find_lora_layers(model)
        pen = LaplacePenalty(curv, lam=1.0)
        torch.testing.assert_close(both(model), pen([r.A for r in refs], [r.B for r in refs]))
    with pytest.raises(ValueError, match="keyed by the wrong adapter"):
        LaLoRARegularizer({"x": c_b}, lam=1.0)


def test_an_adapter_on_fewer_layers_can_be_active():
    from problems import batches
    model = _two_adapters(fewer=True)
    model.set_adapter("b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curv = estimate_curvature(model, batches(), variant="kfac", progress=False)
    assert curv.adapter_name == "b" and len(curv.adapters) == 2 and all("q_proj" in n for n in curv.adapters)


@pytest.mark.parametrize("extra", [dict(lora_bias=True), dict(modules_to_save=["lm_head"])])
def test_trainable_tensors_outside_lora_are_named(extra):
    from problems import batches, tiny_llama
    base = tiny_llama().get_base_model()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], **extra))
    with pytest.warns(UncoveredParametersWarning, match="trainable tensors are not LoRA A/B weights") as got:
        curv = estimate_curvature(model, batches(), variant="wkfac", progress=False)
    with pytest.warns(UncoveredParametersWarning, match="lora_B.default.bias|modules_to_save") as again:
        LaLoRARegularizer(curv, lam=1.0)(model)
    # both point at the user's line, not at lalora_kernels' internals
    for rec in (got, again):
        assert {w.filename for w in rec if w.category is UncoveredParametersWarning} == {__file__}


def test_unknown_family_is_refused_and_loss_fn_runs_it():
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)
    model = _lora(BertForMaskedLM(cfg).double(), ["query", "value"])
    ids, mask = _padded(3, 6, 0)
    data = [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}]
    with pytest.raises(ValueError, match="BertForMaskedLM is not a model family the proxy pass knows.*loss_fn"):
        estimate_curvature(model, data, progress=False)

    def mlm(out, b):
        return F.cross_entropy(out.logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100, reduction="sum")
    curv = estimate_curvature(model, data, variant="wkfac", progress=False, storage="dense", loss_fn=mlm)
    ref = base_factors(model, data, lambda m, b: (mlm(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]),
                                                       b), {"encoder": b["attention_mask"]}), lambda n: "encoder")
    for name, f in ref.items():
        torch.testing.assert_close(curv.dense(f"Sg/{name}"), f["Sg"], rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="with loss_fn use fisher='empirical'"):
        estimate_curvature(model, data, progress=False, fisher="mc", loss_fn=mlm)


def test_ddp_wrapped_model_has_the_plain_layer_names(tmp_path):
    import torch.distributed as dist
    from problems import tiny_llama
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = tiny_llama()
        plain = [r.name for r in find_lora_layers(model)]
        assert [r.name for r in find_lora_layers(DDP(model))] == plain
    finally:
        dist.destroy_process_group()


def bert_tokens():
    from transformers import BertConfig, BertForTokenClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                     num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = _lora(BertForTokenClassification(cfg).double(), ["query", "key", "value", "dense"])
    data = []
    for k in range(2):
        ids, mask = _padded(3, 6, k)
        y = torch.randint(0, 5, (3, 6), generator=torch.Generator().manual_seed(40 + k))
        data.append({"input_ids": ids, "attention_mask": mask, "labels": y.masked_fill(mask == 0, -100)})

    def loss_of(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return (F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100, reduction="sum"),
                {"encoder": b["attention_mask"]})
    return model, data, loss_of, lambda n: "encoder"


FAMILIES["bert token classifier"] = bert_tokens


def test_token_classifier_curvature_is_its_own_loss_s():
    test_each_family_s_curvature_is_its_own_loss_s("bert token classifier")


@pytest.mark.parametrize("family", ["bart", "bert classifier", "bert regression", "bert token classifier"])
def test_mc_fisher_runs_on_every_family(family):
    """MC labels drawn from each family's own predictive distribution: Sx is label-free, so it equals
    the empirical Fisher's; Sg is finite and positive semi-definite."""
    model, data, *_ = FAMILIES[family]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emp = estimate_curvature(model, data, variant="wkfac", progress=False, storage="dense")
        mc = estimate_curvature(model, data, variant="wkfac", fisher="mc", mc_samples=2, progress=False,
                                storage="dense", generator=torch.Generator().manual_seed(0))
    for name in emp.adapters:
        torch.testing.assert_close(mc.sx(name), emp.sx(name), rtol=1e-12, atol=1e-15)
        Sg = mc.dense(f"Sg/{name}")
        assert bool(torch.isfinite(Sg).all()) and float(torch.linalg.eigvalsh(Sg).min()) > -1e-12
