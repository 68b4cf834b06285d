import json
import math
import os
import re
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.semantics.ssft import SSFTConfig, SSFTTrainer, infonce_loss, retrieval_metrics
from recsys_llm.semantics.ssft_examples import build_examples, examples_digest
from recsys_llm.semantics.templates import PromptTemplates, select_fields

# A 2-layer random model routes the value token to the last position within a few dozen
# steps only in a short prompt; the full Alpaca prompt is checked in test_templates.py.
SHORT = PromptTemplates(prompt="### Input:\n{input}\n\n### Response:\n")


def _config(model_dir: str, **overrides) -> SSFTConfig:
    settings = dict(model_path=model_dir, samples_train=40, samples_valid=10, epochs=4, batch_size=16,
                    learning_rate=3e-3, templates=SHORT, seed=0)
    settings.update(overrides)
    return SSFTConfig(**settings)


class TestExamples:
    def test_the_examples_digest_covers_the_held_out_prompts(self, tiny_schema: DatasetSchema) -> None:
        """A resume is refused over other data (the digest is in the checkpoint's signature): held-out values
        that changed, or moved to training, would make the "before" and "after" accuracies incomparable."""
        config = SSFTConfig(samples_train=8, samples_valid=2)
        train, valid = build_examples(tiny_schema, select_fields(tiny_schema), config)
        texts = ["a", "b", "c", "d"]
        digest = examples_digest(texts, train, valid)
        assert examples_digest(texts, train, valid[:-1]) != digest
        assert examples_digest(texts, train + valid[-1:], valid[:-1]) != digest
        assert examples_digest(texts, train, list(reversed(valid))) != digest
        assert examples_digest(list(texts), list(train), list(valid)) == digest

    def test_disjoint_train_and_held_out_values(self, tiny_schema: DatasetSchema) -> None:
        fields = select_fields(tiny_schema)
        train, valid = build_examples(tiny_schema, fields, SSFTConfig(samples_train=30, samples_valid=5))
        assert len(train) == 4 * 30 and len(valid) == 4 * 5
        for label in range(4):
            train_values = {e.value for e in train if e.label == label}
            valid_values = {e.value for e in valid if e.label == label}
            assert len(train_values) == 30 and len(valid_values) == 5 and not train_values & valid_values
        assert "The feature is: shade" in train[0].prompt and "[color, city, user_id, price]" in train[0].prompt

    def test_s_valid_held_out_when_more_than_a_fifth_of_the_sample(self, tiny_schema: DatasetSchema) -> None:
        """``experiments.llactr --quick``'s S = 16 / 8 on fields of 100 values used to hold out 24 // 5 = 4 values of
        the 24 sampled, leaving 4 neither held out nor tuned on."""
        fields = select_fields(tiny_schema)
        train, valid = build_examples(tiny_schema, fields, SSFTConfig(samples_train=16, samples_valid=8))
        for label in range(4):
            assert sum(e.label == label for e in valid) == 8 and sum(e.label == label for e in train) == 16
        # a field too small for both still keeps most of its values for training
        small = build_examples(tiny_schema, fields, SSFTConfig(samples_train=200, samples_valid=50))
        assert [sum(e.label == label for e in small[1]) for label in range(4)] == [19, 19, 39, 20]  # 99 values (id 0 is missing), the 199 user ids of the data, 100 prices

    def test_a_field_left_without_values_is_warned_about(self, tiny_schema: DatasetSchema) -> None:
        """Such a field used to be tuned silently as a wrong answer only, never as the right one."""
        blank = pa.table({"id": pa.array(range(100), pa.int64()), "text": pa.array([" "] * 100, pa.string())})
        pq.write_table(blank, tiny_schema.value_text_path("city"))
        config = SSFTConfig(samples_train=400, samples_valid=10, include_fields_without_description=True)
        with pytest.warns(UserWarning, match=r"no value to tune on for field\(s\) 'city' \(no value in the data\):"):
            train, valid = build_examples(tiny_schema, select_fields(tiny_schema, True), config)
        assert {e.label for e in train} == {0, 2, 3, 4}  # color, user_id, C1 (ids 5-9 are no user id), price

    def test_values_of_an_earlier_field_in_another_case_are_left_out(self, tiny_schema: DatasetSchema) -> None:
        """Only exact repeats were left out: MiniLM (uncased) read city's "SHADE 3" as color's "shade 3", a prompt
        held out for one field and trained on for the other."""
        shouted = pa.table({"id": pa.array(range(100), pa.int64()), "text": [f"SHADE  {i}" for i in range(100)]})
        pq.write_table(shouted, tiny_schema.value_text_path("city"))
        with pytest.warns(UserWarning, match=r"for field\(s\) 'city' \(its sampled values are all values of earlier "
                                             r"fields\)"):
            train, valid = build_examples(tiny_schema, select_fields(tiny_schema), SSFTConfig(samples_valid=10))
        assert 1 not in {e.label for e in train + valid}

    def test_fields_of_bare_ids_are_warned_about(self, tiny_schema: DatasetSchema) -> None:
        """SSFT sampled "values" of a field without value texts from its id range: on Criteo's hashed fields, hash
        buckets of which 1 in 60 occurred in the data, the same numbers in every field, and nothing said so."""
        config = SSFTConfig(samples_train=400, samples_valid=0, include_fields_without_description=True)
        with pytest.warns(UserWarning, match=r"field\(s\) 'user_id', 'C1' have no value texts \(value_text\): SSFT "
                                             r"reads their ids as the feature values, numbers alike in each of them"):
            train, _ = build_examples(tiny_schema, select_fields(tiny_schema, True), config)
        in_data = {(7 * i) % 300 for i in range(200)} - {0}  # make_schema's user ids
        assert {int(e.value) for e in train if e.label == 2} == in_data
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one id field alone (a user id, as in the public code): no warning
            build_examples(tiny_schema, select_fields(tiny_schema), SSFTConfig(samples_valid=10))

    def test_retrieval_metrics_say_the_chance_level_and_each_fields_accuracy(self) -> None:
        """Only the accuracy over all held-out examples was reported: on synthetic data 97.5% of them were of 5 of
        the 12 fields, and "before" 0.173 came from answering item_id to every one, with no chance level beside it."""
        keys = torch.eye(3)  # fields 0, 1, 2
        queries = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])  # all retrieve field 0 or 1
        labels = torch.tensor([0, 0, 0, 2])
        metrics = retrieval_metrics(queries, keys, labels, 0.02)
        assert metrics["accuracy"] == 0.75 and metrics["per_field"] == {0: 1.0, 2: 0.0}
        assert metrics["macro_accuracy"] == 0.5 and metrics["chance"] == pytest.approx(1 / 3) and metrics["count"] == 4
        empty = retrieval_metrics(torch.zeros(0, 3), keys, torch.zeros(0, dtype=torch.long), 0.02)
        assert empty["count"] == 0 and empty["per_field"] == {} and empty["chance"] == pytest.approx(1 / 3)

    def test_infonce_of_bfloat16_states_is_computed_in_float32(self) -> None:
        """An LLM in bfloat16 gives bfloat16 states: the cosines, divided by a temperature of 0.02, are computed in
        float32 (bfloat16 rounding, times 50, would move the loss)."""
        torch.manual_seed(0)
        q, k, y = torch.randn(8, 64).bfloat16(), torch.randn(5, 64).bfloat16(), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
        expected = infonce_loss(q.float(), k.float(), y, 0.02)
        torch.testing.assert_close(infonce_loss(q, k, y, 0.02), expected, atol=1e-5, rtol=1e-5)
        assert infonce_loss(q, k, y, 0.02).dtype == torch.float32

    def test_infonce_matches_formula(self) -> None:
        torch.manual_seed(0)
        q, k, y = torch.randn(3, 5), torch.randn(4, 5), torch.tensor([0, 3, 1])
        qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
        sims = torch.exp(qn @ kn.t() / 0.02)
        expected = -torch.log(sims[torch.arange(3), y] / sims.sum(dim=1)).mean()
        torch.testing.assert_close(infonce_loss(q, k, y, 0.02), expected)

    def test_the_held_out_loss_is_the_training_infonce_at_the_same_temperature(self) -> None:
        """metrics.json's held-out loss (before / after, per epoch) is the loss training lowers: InfoNCE at the
        configured temperature, comparable with the training loss."""
        torch.manual_seed(0)
        q, k, y = torch.randn(6, 5), torch.randn(4, 5), torch.tensor([0, 3, 1, 2, 2, 0])
        for temperature in (0.02, 0.5):
            loss = retrieval_metrics(q, k, y, temperature)["loss"]
            assert loss == pytest.approx(infonce_loss(q, k, y, temperature).item(), rel=1e-5)


class TestSSFT:
    def test_tiny_decoder_lowers_loss_and_raises_held_out_accuracy(self, tmp_path, tiny_llama_dir, tiny_schema) -> None:
        out = str(tmp_path / "ssft")
        metrics = SSFTTrainer(_config(tiny_llama_dir), tiny_schema, out).run()
        before, after = metrics["before"], metrics["after"]
        assert after["loss"] < 0.5 * before["loss"], metrics["history"]
        assert after["accuracy"] >= before["accuracy"] + 0.3 and after["accuracy"] >= 0.7, metrics["history"]
        assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
        assert os.path.exists(os.path.join(out, "adapter", "adapter_model.safetensors"))
        with open(os.path.join(out, "metrics.json")) as handle:
            assert json.load(handle)["after"] == after
        assert set(after["per_field"]) == {"color", "city", "user_id", "price"} and after["chance"] == 0.25

    def test_before_and_after_are_scored_on_the_same_held_out_prompts(self, tmp_path, tiny_llama_dir,
                                                                     tiny_schema) -> None:
        """The accuracy before tuning is the untuned model's on the held-out values, as the one after is: scored on
        training prompts it would be no baseline for the held-out accuracy after tuning."""
        trainer = SSFTTrainer(_config(tiny_llama_dir, epochs=1, samples_train=8, samples_valid=2), tiny_schema,
                              str(tmp_path / "ssft"))
        untuned = trainer.evaluate()
        metrics = trainer.run()
        assert metrics["num_valid"] == 4 * 2 and metrics["num_train"] == 4 * 8
        assert metrics["before"]["count"] == metrics["after"]["count"] == metrics["num_valid"]
        assert metrics["before"]["loss"] == pytest.approx(untuned["loss"], rel=1e-5)

    def test_resume_continues_where_it_stopped(self, tmp_path, tiny_llama_dir, tiny_schema) -> None:
        small = dict(samples_train=8, samples_valid=2, lora_dropout=0.0)
        resumed_dir, straight_dir = str(tmp_path / "resumed"), str(tmp_path / "straight")
        first = SSFTTrainer(_config(tiny_llama_dir, epochs=1, **small), tiny_schema, resumed_dir).run()
        resumed = SSFTTrainer(_config(tiny_llama_dir, epochs=2, **small), tiny_schema, resumed_dir).run()
        straight = SSFTTrainer(_config(tiny_llama_dir, epochs=2, **small), tiny_schema, straight_dir).run()
        assert resumed["epochs"] == 2 and resumed["history"][0] == first["history"][0]
        assert resumed["after"]["loss"] == pytest.approx(straight["after"]["loss"], rel=1e-4)
        # no epoch left: the checkpoint's weights are scored once, for the final scores
        again = SSFTTrainer(_config(tiny_llama_dir, epochs=2, **small), tiny_schema, resumed_dir)
        scorings = []
        evaluate = again.evaluate
        again.evaluate = lambda *args: scorings.append(1) or evaluate(*args)
        assert again.run()["after"]["loss"] == pytest.approx(resumed["after"]["loss"], rel=1e-4) and scorings == [1]
        with pytest.raises(ValueError, match=r"other settings \(learning_rate: 0.003 -> 0.0001\)"):
            SSFTTrainer(_config(tiny_llama_dir, epochs=3, learning_rate=1e-4, **small), tiny_schema, resumed_dir).run()

    def test_the_learning_rate_follows_its_schedule_and_resumes_where_it_stopped(self, tmp_path, tiny_llama_dir,
                                                                                 tiny_schema) -> None:
        """The public code warms up and decays the rate (HF Trainer); SSFT only had a constant one."""
        from safetensors.torch import load_file

        settings = dict(samples_train=8, samples_valid=2, batch_size=8, epochs=2, lr_schedule="linear", warmup_steps=3)
        straight = SSFTTrainer(_config(tiny_llama_dir, **settings), tiny_schema, str(tmp_path / "straight"))
        steps = straight._steps_per_epoch() * 2
        rates = []
        step = straight._steps.step

        def recording_step():
            rates.append(straight._optimizer.param_groups[0]["lr"])
            step()

        straight._steps.step = recording_step
        straight.run()
        expected = [3e-3 * (s / 3 if s < 3 else (steps - s) / (steps - 3)) for s in range(steps)]
        assert rates == pytest.approx(expected)

        interrupted = SSFTTrainer(_config(tiny_llama_dir, **settings), tiny_schema, str(tmp_path / "resumed"))
        train_epoch = interrupted.train_epoch

        def killed_in_the_second_epoch(epoch: int) -> float:
            if epoch == 1:
                raise KeyboardInterrupt
            return train_epoch(epoch)

        interrupted.train_epoch = killed_in_the_second_epoch
        with pytest.raises(KeyboardInterrupt):
            interrupted.run()
        SSFTTrainer(_config(tiny_llama_dir, **settings), tiny_schema, str(tmp_path / "resumed")).run()
        adapters = [load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
                    for name in ("straight", "resumed")]
        assert adapters[0].keys() == adapters[1].keys()
        for key in adapters[0]:
            torch.testing.assert_close(adapters[1][key], adapters[0][key], rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"other settings \(lr_schedule: 'linear' -> 'cosine'\)"):
            SSFTTrainer(_config(tiny_llama_dir, **{**settings, "lr_schedule": "cosine", "epochs": 3}), tiny_schema,
                        str(tmp_path / "resumed")).run()
        # more epochs would stretch the decay the first ones followed: an adapter of neither schedule
        with pytest.raises(ValueError, match=r"--lr-schedule linear over --epochs 2, not 3"):
            SSFTTrainer(_config(tiny_llama_dir, **{**settings, "epochs": 3}), tiny_schema,
                        str(tmp_path / "resumed")).run()
        # the dtype is compared as resolved on this device: auto is float32 on a CPU, as fp32 and float32 are
        from recsys_llm.semantics.model_loading import resolve_device, resolve_dtype

        auto = str(resolve_dtype("auto", resolve_device(None))).removeprefix("torch.")  # bfloat16 on a recent GPU
        other = "bfloat16" if auto == "float32" else "float32"
        for same in {"float32": ("fp32", "float32"), "bfloat16": ("bf16", "bfloat16")}[auto]:
            SSFTTrainer(_config(tiny_llama_dir, **{**settings, "dtype": same}), tiny_schema,
                        str(tmp_path / "resumed")).run()
        with pytest.raises(ValueError, match=rf"other settings \(resolved_dtype: '{auto}' -> '{other}'\)"):
            SSFTTrainer(_config(tiny_llama_dir, **{**settings, "dtype": other}), tiny_schema,
                        str(tmp_path / "resumed")).run()
        with pytest.raises(ValueError, match=r"lr_schedule \(semantics tune --lr-schedule\) must be one of"):
            SSFTConfig(lr_schedule="step")

    def test_each_epoch_reads_every_prompt_once_in_its_own_order(self, tmp_path, tiny_llama_dir, tiny_schema) -> None:
        trainer = SSFTTrainer(_config(tiny_llama_dir, samples_train=8, samples_valid=2), tiny_schema,
                              str(tmp_path / "ssft"))
        train, _ = trainer.examples
        prompts = {e.prompt for e in train}
        embed, seen = trainer.encoder.embed, []

        def recording_embed(texts):  # the real encoder; records which prompts each step reads
            seen.extend(t for t in texts if t in prompts)
            return embed(texts)

        trainer.encoder.embed = recording_embed
        orders = []
        for epoch in range(2):
            trainer.train_epoch(epoch)
            orders.append(list(seen))
            seen.clear()
        assert all(sorted(order) == sorted(e.prompt for e in train) for order in orders)
        assert orders[0] != orders[1]  # reshuffled every epoch, not one order for all

    def test_bert_style_encoder(self, tmp_path, tiny_bert_dir, tiny_schema, capsys) -> None:
        config = _config(tiny_bert_dir, epochs=2, samples_train=24, samples_valid=6)
        trainer = SSFTTrainer(config, tiny_schema, str(tmp_path / "bert"))
        assert trainer.encoder.pooling == "mean"
        assert any(".query.lora_A" in n for n, _ in trainer.encoder.model.named_parameters())
        scorings = []
        evaluate = trainer.evaluate
        trainer.evaluate = lambda *args: scorings.append(1) or evaluate(*args)
        metrics = trainer.run()
        assert metrics["after"]["loss"] < metrics["before"]["loss"]
        # the last epoch's held-out scores are the final ones (not scored again), said after each epoch and drawn
        assert len(scorings) == 1 + 2  # before tuning, after each epoch
        assert metrics["after"]["accuracy"] == metrics["history"][-1]["valid_accuracy"]
        err = capsys.readouterr().err
        for epoch in metrics["history"]:
            assert (f"ssft epoch {epoch['epoch']}/2: train loss {epoch['train_loss']:.4f}, held-out field retrieval "
                    f"accuracy {epoch['valid_accuracy']:.3f} (before tuning {metrics['before']['accuracy']:.3f}") in err
        with open(tmp_path / "bert" / "field_retrieval.png", "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"

    def test_target_modules_the_model_lacks_are_named_with_its_linear_modules(self, tmp_path, tiny_bert_dir,
                                                                              tiny_schema) -> None:
        """As the CTR-adapted LLM names them: peft's own error named neither the option nor the model's modules."""
        config = _config(tiny_bert_dir, lora_target_modules=["q_proj", "v_proj"])
        with pytest.raises(ValueError, match=rf"^{re.escape(tiny_bert_dir)}: --target-modules \['q_proj', 'v_proj'\] "
                                             r"\(lora_target_modules\) name no module of BertModel .*its Linear "
                                             r"modules are \[.*'query'.*'value'"):
            SSFTTrainer(config, tiny_schema, str(tmp_path / "bert"))


@pytest.mark.parametrize("setting,value,message", [
    ("epochs", 0, r"SSFTConfig.epochs \(semantics tune --epochs\) must be an integer >= 1, got 0"),
    ("learning_rate", -0.1, r"SSFTConfig.learning_rate \(semantics tune --lr\) must be a finite number > 0, got -0.1"),
    ("batch_size", 0, r"SSFTConfig.batch_size \(semantics tune --batch-size\) must be an integer >= 1, got 0"),
    ("temperature", 0.0, r"SSFTConfig.temperature \(semantics tune --temperature\) must be a finite number > 0"),
    ("samples_train", 0, r"SSFTConfig.samples_train \(semantics tune --samples-train\) must be an integer >= 1"),
    ("lora_dropout", 1.5, r"SSFTConfig.lora_dropout \(semantics tune --lora-dropout\) must be a finite number >= 0 and < 1"),
    ("max_length", -1, r"SSFTConfig.max_length \(semantics tune --max-length\) must be an integer >= 1"),
    ("pooling", "max", r"SSFTConfig.pooling \(semantics tune --pooling\) must be one of"),
])
def test_settings_are_checked_when_the_config_is_made(setting, value, message) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        SSFTConfig(**{setting: value})
    SSFTConfig(samples_valid=0)  # no held-out values is allowed


def test_a_prompt_longer_than_max_length_keeps_its_end(tmp_path, tiny_llama_dir, tiny_schema) -> None:
    """The query is the state at the last prompt token, right before the answer (docs/methods.md section 1):
    a value too long for --max-length is shortened so that the candidate set and ``### Response:`` stay in,
    instead of the tokenizer cutting the prompt's end off and the query landing in the middle of the value."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    long_texts = [" ".join(["shade", str(i)] * 20) for i in range(100)]  # 40 tokens per value
    pq.write_table(pa.table({"id": pa.array(range(100), pa.int64()), "text": long_texts}),
                   tiny_schema.value_text_path("color"))
    max_length = 48  # the SHORT prompt with a short value is ~36 tokens, with a long one ~75
    with pytest.warns(UserWarning, match=r"SSFT: 10 prompt\(s\) longer than max_length 48 tokens"):
        trainer = SSFTTrainer(_config(tiny_llama_dir, samples_train=8, samples_valid=2, max_length=max_length),
                              tiny_schema, str(tmp_path / "ssft"))
    train, valid = trainer.examples
    tokenizer = trainer.encoder.tokenizer
    color = [e for e in train + valid if e.label == 0]
    assert len(color) == 10 and all(e.value.startswith("shade") for e in color)
    for example in train + valid:
        ids = tokenizer(example.prompt)["input_ids"]
        assert len(ids) <= max_length, example.prompt
        assert tokenizer.convert_ids_to_tokens(ids[-3:]) == ["###", "Response", ":"]
        assert "The candidate set is: [color, city, user_id, price]" in example.prompt
    assert trainer.shortened_values == 10


def test_values_shortened_to_one_text_give_no_repeated_prompt(tmp_path, tiny_llama_dir, tiny_schema) -> None:
    """Long values that differ only after what fits (a shared start) used to be shortened to one value: the same
    prompt was tuned on several times and held out too, so the held-out accuracy scored prompts tuned on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    long_texts = ["shade " * 40 + f"tone {i}" for i in range(100)]  # ~40 shared tokens, then the difference
    pq.write_table(pa.table({"id": pa.array(range(100), pa.int64()), "text": long_texts}),
                   tiny_schema.value_text_path("color"))
    with pytest.warns(UserWarning, match=r"SSFT: 10 prompt\(s\) longer than max_length 48 tokens"):
        trainer = SSFTTrainer(_config(tiny_llama_dir, samples_train=8, samples_valid=2, max_length=48),
                              tiny_schema, str(tmp_path / "ssft"))
    train, valid = trainer.examples
    prompts = [e.prompt for e in train + valid]
    assert len(prompts) == len(set(prompts))
    assert not {e.prompt for e in train} & {e.prompt for e in valid}
    color = [e for e in train + valid if e.label == 0]
    assert len(color) == 1 and color[0].value.startswith("shade shade") and "tone" not in color[0].value
    assert trainer.shortened_values == 10


def test_a_prompt_that_cannot_fit_is_refused(tmp_path, tiny_llama_dir, tiny_schema) -> None:
    with pytest.raises(ValueError, match=r"SSFT prompt without its value is (\d+) tokens, more than max_length 20 "
                                         r".*; raise --max-length \(SSFTConfig\.max_length\) above \1 \(a value's "
                                         r"own tokens come on top\), or shorten the field names \(the candidate set "
                                         r"lists them\)$"):
        SSFTTrainer(_config(tiny_llama_dir, samples_train=8, samples_valid=2, max_length=20), tiny_schema,
                    str(tmp_path / "ssft"))


def test_a_prompt_longer_than_the_models_positions_says_raising_max_length_cannot_help(tmp_path, tiny_llama_dir,
                                                                                      tiny_schema) -> None:
    """BART of 128 positions, --max-length 480: the error said "raise --max-length", capped at 128 whatever it is."""
    from tests.tiny_models import copy_model_dir_with_config

    path, _ = copy_model_dir_with_config(tiny_llama_dir, tmp_path / "short", max_position_embeddings=20)
    with pytest.raises(ValueError, match=r"more than max_length 20 .*; the model's positions cap --max-length 480 "
                                         r"there: use a model with more positions"):
        SSFTTrainer(_config(path, samples_train=8, samples_valid=2, max_length=480), tiny_schema, str(tmp_path / "ssft"))


def test_a_candidate_set_longer_than_the_models_positions_is_refused_as_such(tmp_path, tiny_llama_dir,
                                                                              tiny_schema) -> None:
    """The candidate set lists every field's name (500 fields: 1,942 MiniLM tokens): the error said "raise
    --max-length above 1942" of a model of 512 positions, and "shorten the field descriptions", which no prompt
    holds."""
    from tests.tiny_models import copy_model_dir_with_config

    path, _ = copy_model_dir_with_config(tiny_llama_dir, tmp_path / "short", max_position_embeddings=20)
    with pytest.raises(ValueError, match=r"more than max_length 16 .*; the model's 20 positions cannot hold it, "
                                         r"whatever --max-length: use a model with more positions, fewer fields .*, "
                                         r"shorter field names \(the candidate set lists them\)"):
        SSFTTrainer(_config(path, samples_train=8, samples_valid=2, max_length=16), tiny_schema, str(tmp_path / "ssft"))


def test_prompts_fit_the_model_positions_when_max_length_is_larger(tmp_path, tiny_llama_dir, tiny_schema) -> None:
    """The encoder cuts at --max-length capped at the model's positions (``position_limited``): a prompt is
    fitted to that cap, or the tokenizer still cuts its end (candidate set, ``### Response:``) off."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    long_texts = [" ".join(["shade", str(i)] * 200) for i in range(100)]  # ~400 tokens per value
    pq.write_table(pa.table({"id": pa.array(range(100), pa.int64()), "text": long_texts}),
                   tiny_schema.value_text_path("color"))
    with pytest.warns(UserWarning, match=r"SSFT: 10 prompt\(s\) longer than max_length 256 tokens \(--max-length 1024"):
        trainer = SSFTTrainer(_config(tiny_llama_dir, samples_train=8, samples_valid=2, max_length=1024),
                              tiny_schema, str(tmp_path / "ssft"))
    assert trainer.encoder.max_length == 256  # the tiny Llama's max_position_embeddings
    train, valid = trainer.examples
    for example in train + valid:
        ids = trainer.encoder.tokenizer(example.prompt)["input_ids"]
        assert len(ids) <= 256 and trainer.encoder.tokenizer.convert_ids_to_tokens(ids[-3:]) == ["###", "Response", ":"]


def test_metrics_json_of_a_run_without_held_out_values_is_strict_json(tmp_path, tiny_llama_dir, tiny_schema) -> None:
    """``--samples-valid 0`` has no retrieval accuracy to report: ``null`` in metrics.json, which strict
    JSON readers (jq, JavaScript) read, not a bare ``NaN``."""
    out = tmp_path / "ssft"
    SSFTTrainer(_config(tiny_llama_dir, samples_train=8, samples_valid=0, epochs=1), tiny_schema, str(out)).run()
    text = (out / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"metrics.json holds {name}"))
    assert metrics["after"]["accuracy"] is None


def test_fields_with_the_same_field_text_are_refused(tmp_path) -> None:
    """Two fields whose field texts (InfoNCE's keys) are one text: each is the other's positive and negative,
    neither can be retrieved; it tuned without a word."""
    import dataclasses

    from tests.semantics.conftest import make_schema

    schema = make_schema(str(tmp_path / "data"))
    schema.fields[0] = dataclasses.replace(schema.fields[0], description="a place")  # color
    schema.fields[1] = dataclasses.replace(schema.fields[1], description="a place")  # city
    config = SSFTConfig(templates=PromptTemplates(field="{description}"))
    with pytest.raises(ValueError, match=r"fields 'color' and 'city' have the same field text 'a place'.*\{name\}"):
        SSFTTrainer(config, schema, str(tmp_path / "out"))


def test_an_encoder_decoder_model_is_tuned_into_an_adapter(tmp_path, tiny_schema) -> None:
    """BART: the loader gives its encoder, peft wraps it, and TextEncoder.from_model took the encoder out of the peft
    wrapper again: the "adapter" was a whole model without adapter_config.json, which no encode could load."""
    from transformers import BartConfig, BartModel

    from recsys_llm.semantics.ssft_adapter import load_tuned_encoder
    from tests.tiny_models import save_with_tokenizer, tiny_vocab_size

    bart = BartModel(BartConfig(vocab_size=tiny_vocab_size(), d_model=16, encoder_layers=1, decoder_layers=1,
                                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                decoder_ffn_dim=32, max_position_embeddings=256, pad_token_id=0))
    path = save_with_tokenizer(bart, tmp_path / "bart")
    metrics = SSFTTrainer(_config(path, samples_train=4, samples_valid=1, epochs=1), tiny_schema,
                          str(tmp_path / "ssft")).run()
    assert os.path.isfile(os.path.join(metrics["adapter_dir"], "adapter_config.json"))
    encoder, _ = load_tuned_encoder(metrics["adapter_dir"])
    assert encoder.encode(["shade 3"], progress=False).shape == (1, 16)


@pytest.mark.parametrize("schedule, rate", [
    ("cosine", lambda s, n: 0.5 * (1 + math.cos(math.pi * (s - 2) / (n - 2))) if s >= 2 else s / 2),
    ("constant", lambda s, n: min(1.0, s / 2)),
])
def test_each_schedule_follows_its_curve_after_the_warmup(tmp_path, tiny_llama_dir, tiny_schema, schedule, rate) -> None:
    trainer = SSFTTrainer(_config(tiny_llama_dir, samples_train=8, samples_valid=2, batch_size=8, epochs=2,
                                  lr_schedule=schedule, warmup_steps=2), tiny_schema, str(tmp_path / "ssft"))
    steps = 2 * trainer._steps_per_epoch()
    rates = []
    for _ in range(steps):
        rates.append(trainer._optimizer.param_groups[0]["lr"])
        trainer._optimizer.step()
        trainer._scheduler.step()
    assert rates == pytest.approx([3e-3 * rate(s, steps) for s in range(steps)])


def test_a_checkpoint_of_a_version_without_schedules_resumes(tmp_path, tiny_llama_dir, tiny_schema) -> None:
    """Its signature has no lr_schedule / warmup_steps: those of the constant rate it trained with."""
    out = str(tmp_path / "ssft")
    small = dict(samples_train=8, samples_valid=2, lora_dropout=0.0)
    SSFTTrainer(_config(tiny_llama_dir, epochs=1, **small), tiny_schema, out).run()
    state_path = os.path.join(out, "checkpoint", "state.json")
    with open(state_path, encoding="utf-8") as handle:
        state = json.load(handle)
    for key in ("lr_schedule", "warmup_steps"):
        del state["signature"]["config"][key]
    with open(state_path, "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    assert SSFTTrainer(_config(tiny_llama_dir, epochs=2, **small), tiny_schema, out).run()["epochs"] == 2


def test_the_cli_passes_the_schedule_on(monkeypatch, tiny_schema, tmp_path) -> None:
    from recsys_llm.cli import main
    from recsys_llm.semantics import ssft

    seen = {}

    class Recording:
        def __init__(self, config, schema, output_dir):
            seen["config"] = config

        def run(self):
            raise SystemExit(0)

    monkeypatch.setattr(ssft, "SSFTTrainer", Recording)
    with pytest.raises(SystemExit):
        main(["semantics", "tune", "--schema", os.path.join(tiny_schema.root, "schema.json"), "--output-dir",
              str(tmp_path / "o"), "--lr-schedule", "linear", "--warmup-steps", "5"])
    assert seen["config"].lr_schedule == "linear" and seen["config"].warmup_steps == 5


def test_one_hashed_field_of_bare_ids_is_warned_about(tiny_schema) -> None:
    import dataclasses

    hashed = dataclasses.replace(tiny_schema.field("user_id"), hashed=True)
    fields = [f for f in select_fields(tiny_schema) if f.name != "user_id"] + [hashed]
    with pytest.warns(UserWarning, match=r"field\(s\) 'user_id' \(hashed\) have no value texts"):
        build_examples(tiny_schema, fields, SSFTConfig(samples_valid=2))


def test_fields_whose_texts_are_alike_once_cut_to_max_length_are_refused(tmp_path, tiny_llama_dir) -> None:
    """Field texts that differ only past max_length tokens are one InfoNCE key as the encoder reads them: the
    check of distinct texts compared the whole strings, and SSFT tuned without a word."""
    import dataclasses

    from tests.semantics.conftest import make_schema

    schema = make_schema(str(tmp_path / "data"))
    shared = "shade town " * 20
    schema.fields[0] = dataclasses.replace(schema.fields[0], description=shared + "colour")  # color
    schema.fields[1] = dataclasses.replace(schema.fields[1], description=shared + "city")  # city
    config = SSFTConfig(model_path=tiny_llama_dir, max_length=16, templates=PromptTemplates(field="{description} {name}"))
    with pytest.warns(UserWarning, match=r"SSFT: the text of field\(s\) \['color', 'city'\] is longer than max_length "):
        with pytest.raises(ValueError, match=r"SSFT: fields 'color' and 'city' have texts that are the same 16 tokens"):
            SSFTTrainer(config, schema, str(tmp_path / "out"))


@pytest.mark.parametrize("name", ["include_fields_without_description", "trust_remote_code", "resume",
                                  "gradient_checkpointing"])
def test_switches_are_bools(name):
    """SSFTConfig(resume="false") resumed, trust_remote_code="false" ran the model directory's own code."""
    with pytest.raises(ValueError, match=rf"SSFTConfig\.{name}: expected true or false, got 'false'"):
        SSFTConfig(**{name: "false"})


def test_lora_target_modules_refuses_one_string():
    """peft reads a string as one regular expression of the whole module name: "q_proj" matched no module."""
    with pytest.raises(ValueError, match=r"SSFTConfig\.lora_target_modules: expected a list of names, got the string"):
        SSFTConfig(lora_target_modules="q_proj")


def test_ssft_config_refuses_a_non_string_device():
    from recsys_llm.semantics.ssft import SSFTConfig

    with pytest.raises(ValueError, match=r"SSFTConfig.device: expected a string or None, got 0"):
        SSFTConfig(device=0)
