"""gora.prepare_trainer (trainer.py): GoRA from a transformers Trainer's / TRL SFTTrainer's own batches and loss."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import gora
from _tiny_folders import make_tokenizer, sentiment_rows, sum_rows
from helpers import assert_close, bert_config, llama_config

pytest.importorskip("trl")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sft_trainer(tmp_path, *, eval_rows=0, **args):
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(max_position_embeddings=128, pad_token_id=0, eos_token_id=4, bos_token_id=2))
    rows = [{"prompt": r["prompt"], "completion": " " + r["response"]} for r in sum_rows(40)]
    settings = dict(
        output_dir=str(tmp_path / "trainer"),
        max_steps=12,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        bf16=False,  # TRL turns on bf16 autocast where it can; compare logits in float32
    )
    settings.update(args)
    return SFTTrainer(
        model=model,
        args=SFTConfig(**settings),
        train_dataset=Dataset.from_list(rows[eval_rows:]),
        eval_dataset=Dataset.from_list(rows[:eval_rows]) if eval_rows else None,
        processing_class=tokenizer,
    )


def _config(**kwargs) -> gora.GoraConfig:
    return gora.GoraConfig(
        **{"target_modules": TARGETS, "r": 4, "min_rank": 1, "max_rank": 8, "num_batches": 3, **kwargs}
    )


def test_sft_trainer_trains_the_gora_adapter_and_it_reloads_in_plain_peft(tmp_path):
    """Property: after prepare_trainer, SFTTrainer (completion-only loss, gradient accumulation) trains exactly
    GoRA's adapter: its LoRA layers carry GoRA's ranks, only they require grad, the training loss falls, and the
    saved adapter (with gora_record.json) loads in plain PEFT with identical logits."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    trainer = _sft_trainer(tmp_path)
    base_state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    peft_model = gora.prepare_trainer(trainer, _config(), show_progress=False)
    assert trainer.model is peft_model
    record = peft_model.gora_records["default"]
    assert record.num_batches == 3
    assert peft_model.peft_config["default"].rank_pattern == record.ranks
    assert peft_model.peft_config["default"].task_type == "CAUSAL_LM"
    assert len(set(record.ranks.values())) > 1, "the tiny model should get several ranks"
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    trainer.save_model(str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "gora_record.json").read_text())["ranks"] == record.ranks
    base = LlamaForCausalLM(llama_config(max_position_embeddings=128, pad_token_id=0, eos_token_id=4, bos_token_id=2))
    base.load_state_dict(base_state)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.tensor([[2, 20, 21, 22, 23, 24]])
    with torch.no_grad():
        assert_close(reloaded(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits, rtol=1e-6)


def test_gradient_batches_are_the_trainers_own_and_auto_gamma_uses_its_eval_set(tmp_path):
    """Property: estimation runs the trainer's own compute_loss on its training batches (train mode, with grad,
    completion-only labels: prompt tokens are -100), N of them; gamma='auto' evaluates on the eval dataloader
    (eval mode, no grad), and the trainer's logged metrics are not polluted by these extra forwards."""
    trainer = _sft_trainer(tmp_path, eval_rows=8, per_device_eval_batch_size=4)
    calls = []
    original = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        calls.append((torch.is_grad_enabled(), model.training, bool((inputs["labels"] == -100).any())))
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    metrics_before = json.dumps({k: dict(v) for k, v in trainer._metrics.items()})
    peft_model = gora.prepare_trainer(
        trainer, _config(gamma="auto", gamma_batches=2, gamma_candidates=(1e-2, 1e-1)), show_progress=False
    )
    estimation, search = calls[:3], calls[3:]
    assert estimation == [(True, True, True)] * 3
    assert len(search) == 2 * (2 + 1) and not any(grad or training for grad, training, _ in search)
    assert peft_model.gora_records["default"].extra["gamma_search"]["source"] == "eval_dataloader"
    assert json.dumps({k: dict(v) for k, v in trainer._metrics.items()}) == metrics_before
    assert trainer._total_train_tokens == 0


def test_plain_trainer_with_gradient_accumulation_and_a_classification_head(tmp_path):
    """Property: a plain transformers Trainer (sequence classification, gradient accumulation) trains GoRA's adapter
    and PEFT's new classification head; the base weights stay as they were."""
    from transformers import BertForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(pad_token_id=0))
    rows = sentiment_rows(48)
    encoded = [{**tokenizer(r["text"], truncation=True, max_length=16), "labels": r["label"]} for r in rows]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=10,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=encoded, data_collator=DataCollatorWithPadding(tokenizer))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = gora.prepare_trainer(
        trainer, _config(target_modules=["query", "value"], num_batches=2), show_progress=False
    )
    assert peft_model.peft_config["default"].task_type == "SEQ_CLS"
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert sum(losses[-3:]) < sum(losses[:3])
    trained_base = peft_model.get_base_model().state_dict()
    for key, value in base.items():
        peft_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        if "classifier" not in key:
            assert torch.equal(trained_base.get(peft_key, trained_base.get(key)), value), key


def test_refusals_leave_the_trainer_as_it_was(tmp_path):
    """Property: a trainer whose optimizer already exists, or whose model already carries adapters (peft_config
    given to SFTTrainer), is refused with the fix in the message; its model is not replaced."""
    from peft import LoraConfig

    trainer = _sft_trainer(tmp_path)
    trainer.create_optimizer()
    model = trainer.model
    with pytest.raises(ValueError, match="before train"):
        gora.prepare_trainer(trainer, _config(), show_progress=False)
    assert trainer.model is model

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with_peft = SFTTrainer(
        model=_sft_trainer(tmp_path).model,
        args=SFTConfig(output_dir=str(tmp_path / "p"), report_to=[], use_cpu=True, max_steps=1),
        train_dataset=Dataset.from_list([{"prompt": "what is 1 + 1 ?", "completion": " 2"}] * 4),
        processing_class=make_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
    )
    with pytest.raises(ValueError, match="no peft_config"):
        gora.prepare_trainer(with_peft, _config(), show_progress=False)


def test_two_processes_estimate_on_their_shards_and_equal_one_process_over_both(tmp_path):
    """Property: under torchrun (2 gloo processes, the process group started by the Trainer's own arguments) each
    rank estimates on its own shard of the trainer's batches, the statistics are summed once, so both ranks build the
    same adapter (bit for bit) and it equals one process run over both ranks' batches (A0 exactly, B0 up to float
    rounding); DDP then trains it identically on both ranks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from _trainer_worker import NUM_BATCHES, config, make_model

    worker = Path(__file__).with_name("_trainer_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    done = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["world"] == 2 and ranks[0]["num_batches"] == ranks[1]["num_batches"] == 2 * NUM_BATCHES
    for key in ranks[0]["init"]:  # same code on the same all-reduced sums: bit for bit
        assert torch.equal(ranks[0]["init"][key], ranks[1]["init"][key]), key
        assert torch.equal(ranks[0]["trained"][key], ranks[1]["trained"][key]), key
    assert ranks[0]["batches"][0]["input_ids"].shape != ranks[1]["batches"][0]["input_ids"].shape or not torch.equal(
        ranks[0]["batches"][0]["input_ids"], ranks[1]["batches"][0]["input_ids"]
    ), "the ranks should estimate on different shards"
    batches = [b for rank in ranks for b in rank["batches"][:NUM_BATCHES]]
    single_config = dataclasses.replace(config(), num_batches=2 * NUM_BATCHES, lora_kwargs={"task_type": "CAUSAL_LM"})
    single = gora.get_gora_model(make_model(), single_config, batches, show_progress=False)
    expected = {k: v for k, v in single.named_parameters() if "lora_" in k}
    assert expected.keys() == ranks[0]["init"].keys()
    for key, value in expected.items():
        if "lora_A" in key:
            assert torch.equal(ranks[0]["init"][key], value), key  # drawn from (seed, name) by the same generator
        else:
            assert_close(ranks[0]["init"][key], value.detach(), rtol=1e-4, msg=key)  # other summation order
