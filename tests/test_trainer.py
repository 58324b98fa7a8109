"""LaLoRA inside transformers.Trainer: penalty logged, checkpointed, restored; accumulation-exact."""
import os
import warnings

import pytest
import torch
from problems import tiny_llama
from transformers import TrainingArguments

from lalora_kernels import LaLoRARegularizer, LoRACurvature
from lalora_kernels.integrations import CURVATURE_FILE, LaLoRATrainer, LaLoRATrainerMixin
from lalora_kernels.apps.tiny import random_batches


class Rows(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        b = random_batches(1, n, 8, 37, pad=False, seed=seed)[0]
        self.rows = [{k: v[i] for k, v in b.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, save_steps=2,
                report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(tmp_path, **kw):
    model = tiny_llama(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LaLoRATrainer(model=model, args=_args(tmp_path, **kw.pop("args", {})),
                             train_dataset=Rows(16, seed=3), lalora_source=Rows(8, seed=4),
                             lalora_variant="wkfac", lalora_lam=5.0, **kw)


@pytest.mark.parametrize("bf16", [False, True])
def test_trainer_logs_penalty_and_checkpoints_curvature(tmp_path, bf16):
    trainer = _trainer(tmp_path, args={"bf16": bf16})
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    assert all("lalora_penalty" in h and "task_loss" in h for h in logs)
    assert logs[0]["lalora_penalty"] == 0.0 and logs[-1]["lalora_penalty"] > 0   # starts at the anchor
    ckpt = tmp_path / "run" / "checkpoint-2"
    saved = LoRACurvature.load(str(ckpt / CURVATURE_FILE))
    for k, t in trainer.lalora_curvature.tensors.items():
        assert torch.equal(saved.tensors[k], t.cpu())


def test_resume_restores_the_curvature(tmp_path):
    first = _trainer(tmp_path)
    first.train()
    ckpt = str(tmp_path / "run" / "checkpoint-2")
    other = LoRACurvature.load(os.path.join(ckpt, CURVATURE_FILE))
    key = next(k for k in other.tensors if k.startswith("Sg/"))
    other.tensors[key] = other.tensors[key] * 3          # a different curvature to start from
    second = _trainer(tmp_path, lalora_curvature=other)
    second.train(resume_from_checkpoint=ckpt)
    restored = LoRACurvature.load(os.path.join(ckpt, CURVATURE_FILE))
    assert torch.equal(second.lalora_curvature.tensors[key].cpu(), restored.tensors[key])


def test_resume_without_the_curvature_file_is_an_error(tmp_path):
    first = _trainer(tmp_path)
    first.train()
    ckpt = str(tmp_path / "run" / "checkpoint-2")
    os.remove(os.path.join(ckpt, CURVATURE_FILE))
    with pytest.raises(FileNotFoundError, match="holds no lalora_curvature.safetensors.*allow_missing_curvature"):
        _trainer(tmp_path).train(resume_from_checkpoint=ckpt)
    kept = _trainer(tmp_path, lalora_allow_missing_curvature=True)
    before = kept.lalora_curvature
    kept.train(resume_from_checkpoint=ckpt)
    assert kept.lalora_curvature is before


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_penalty_added_once_per_optimizer_step(tmp_path, steps):
    trainer = _trainer(tmp_path, args={"gradient_accumulation_steps": steps})
    trainer.current_gradient_accumulation_steps = steps
    model = trainer.model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    pen = float(LaLoRARegularizer(trainer.lalora_curvature, lam=5.0)(model).detach())
    for num_items in (None, int((batch["labels"][:, 1:] != -100).sum())):
        torch.manual_seed(0)       # same dropout masks in both calls
        with_pen = float(trainer.compute_loss(model, batch, num_items_in_batch=num_items).detach())
        torch.manual_seed(0)
        plain = float(super(LaLoRATrainerMixin, trainer).compute_loss(
            model, batch, num_items_in_batch=num_items).detach())
        scaled = (trainer.model_accepts_loss_kwargs and num_items is not None) or \
            trainer.compute_loss_func is not None
        # the trainer divides an unscaled loss by the accumulation steps itself
        expected = pen / steps if scaled else pen
        assert with_pen - plain == pytest.approx(expected, rel=1e-5)


def test_source_in_every_form_a_user_passes(tmp_path):
    """A map-style dataset, a datasets.Dataset, a list of examples, a DataLoader and a list of ready
    batches of the same rows give the same curvature (collated by the trainer's collator)."""
    from datasets import Dataset
    rows = Rows(8, seed=4)
    collate = lambda xs: {k: torch.stack([x[k] for x in xs]) for k in xs[0]}  # noqa: E731
    forms = {
        "dataset": rows,
        "datasets.Dataset": Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows.rows]),
        "list of examples": [{k: v.tolist() for k, v in r.items()} for r in rows.rows],
        "DataLoader": torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=collate),
        "list of batches": [collate(rows.rows[i:i + 2]) for i in range(0, 8, 2)],
    }
    curvs = {}
    for name, source in forms.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = LaLoRATrainer(model=tiny_llama(torch.float32), args=_args(tmp_path), train_dataset=Rows(16, 3),
                                    lalora_source=source, lalora_variant="wkfac", lalora_lam=5.0)
        curvs[name] = trainer.lalora_curvature
    ref = curvs["dataset"]
    for name, curv in curvs.items():
        assert curv.num_tokens == ref.num_tokens == 64, name
        for k, t in ref.tensors.items():
            torch.testing.assert_close(curv.tensors[k], t, rtol=1e-5, atol=1e-7, msg=name)


def test_trainer_needs_curvature_or_source(tmp_path):
    with pytest.raises(ValueError, match="lalora_curvature.*lalora_source"):
        LaLoRATrainer(model=tiny_llama(torch.float32), args=_args(tmp_path), train_dataset=Rows(4, 0))


def test_trl_sft_trainer_with_lalora(tmp_path):
    import trl                          # a dev dependency: always installed by `make test`
    from datasets import Dataset
    from problems import tiny_hf_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lalora_kernels.integrations import make_lalora_trainer
    from lalora_kernels.apps.tiny import add_lora
    tiny_hf_folder(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    model = add_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), r=4, nonzero_b=0.1)
    texts = [f"the cat sat {'on the mat ' * (1 + k % 3)}" for k in range(12)]
    source = [{k: v for k, v in tok(t, return_tensors="pt").items()} for t in texts[:2]]
    source = [dict(b, labels=b["input_ids"].clone()) for b in source]
    cfg = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=2,
                        logging_steps=1, save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True,
                        dataset_text_field="text", max_length=32)
    Trainer = make_lalora_trainer(trl.SFTTrainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=cfg, train_dataset=Dataset.from_dict({"text": texts}),
                          processing_class=tok, lalora_source=source, lalora_lam=1.0)
        trainer.train()
    assert any("lalora_penalty" in h for h in trainer.state.log_history)
    assert (tmp_path / "sft" / "checkpoint-3" / CURVATURE_FILE).exists()


def test_trainer_with_gradient_checkpointing(tmp_path):
    trainer = _trainer(tmp_path, args={"gradient_checkpointing": True, "max_steps": 2, "save_steps": 2})
    trainer.train()
    logs = [h for h in trainer.state.log_history if "lalora_penalty" in h]
    assert len(logs) == 2 and logs[-1]["lalora_penalty"] > 0


def test_lalora_source_columns_are_pruned_like_the_train_set(tmp_path):
    """A tokenized datasets.Dataset that still holds its text works as lalora_source (Trainer drops
    the columns the model's forward does not take), and gives the curvature of the bare rows."""
    import datasets
    rows = Rows(8, seed=4).rows
    ds = datasets.Dataset.from_list([{**{k: v.tolist() for k, v in r.items()}, "text": "abc"} for r in rows])
    model = tiny_llama(torch.float32)

    def stack(features):        # a collator that, like the LM ones, tensorises every field it gets
        return {k: torch.tensor([list(f[k]) for f in features]) for k in features[0]}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = LaLoRATrainer(model=model, args=_args(tmp_path), train_dataset=Rows(16, seed=3),
                                data_collator=stack, lalora_source=ds, lalora_variant="kfac")
        bare = LaLoRATrainer(model=model, args=_args(tmp_path), train_dataset=Rows(16, seed=3),
                             data_collator=stack, lalora_source=Rows(8, seed=4), lalora_variant="kfac")
    for k, t in bare.lalora_curvature.tensors.items():
        torch.testing.assert_close(trainer.lalora_curvature.tensors[k], t, rtol=1e-5, atol=1e-7)
