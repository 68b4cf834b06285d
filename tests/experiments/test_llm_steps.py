"""The LLM steps of the table drivers run as the drivers write them (CLI arguments included)."""

import os

from experiments.llactr import llm_steps
from recsys_llm.semantics.store import load_vectors
from tests.semantics.conftest import make_schema


def test_llactr_ssft_then_encode(tmp_path, capsys) -> None:
    schema = make_schema(str(tmp_path / "data"))
    schema_path = os.path.join(schema.root, "schema.json")
    vectors, metrics = llm_steps(schema_path, str(tmp_path / "work"), quick=True)
    stored = load_vectors(vectors, schema=schema)
    assert stored.keys == ["color", "city", "user_id", "price"] and os.path.exists(metrics)
    assert "+ssft:" in stored.provenance.model_id


def test_elec_row_vectors_read_the_chosen_fields_at_the_chosen_length(tmp_path) -> None:
    """``experiments.elec --granularity row --row-fields ... --max-length N`` tunes and exports with them."""
    import json

    import pyarrow.parquet as pq
    import pytest

    from experiments.elec import llm_steps as elec_llm_steps
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.data.synthetic import generate_synthetic

    generate_synthetic(str(tmp_path / "data"), 600, seed=0)
    with pytest.warns(UserWarning, match=r"32 of 32 row texts are longer than max_length 40 tokens"):
        schema_path, overrides = elec_llm_steps(str(tmp_path / "data" / "schema.json"), str(tmp_path / "work"), "row",
                                                ["user_id"], 32, ["user_id", "item_id"], 40)
    assert overrides == []  # row vectors are attached to copies of the splits
    llm_dir = tmp_path / "work" / "ctr_llm"
    assert json.loads((llm_dir / "row_text.json").read_text(encoding="utf-8"))["fields"] == ["user_id", "item_id"]
    assert json.loads((llm_dir / "config.json").read_text(encoding="utf-8"))["max_length"] == 40
    attached = DatasetSchema.load(schema_path)
    assert "llm_vector" in pq.read_schema(attached.split_path("train")).names
    # a kill between the model's save and the removal of its tuning checkpoint leaves the checkpoint:
    # the next run skips the done step and removes it
    from recsys_llm.semantics.ctr_llm_checkpoint import adapt_checkpoint_dir

    leftover = adapt_checkpoint_dir(str(llm_dir))
    os.makedirs(leftover)
    with open(os.path.join(leftover, "state.json"), "w", encoding="utf-8") as handle:
        handle.write("{}")
    elec_llm_steps(str(tmp_path / "data" / "schema.json"), str(tmp_path / "work"), "row",
                   ["user_id"], 32, ["user_id", "item_id"], 40)
    assert not os.path.exists(leftover)


def test_llactr_random_control_vectors_keep_the_keys_shape_and_schema(tmp_path) -> None:
    """``experiments.llactr --field-vectors random``: Gaussian vectors under the LLM vectors' keys and schema."""
    import torch

    from experiments.llactr import random_field_vectors
    from recsys_llm.semantics.store import VectorProvenance, save_vectors

    schema = make_schema(str(tmp_path / "data"))
    names = schema.sparse_feature_names + schema.dense_feature_names
    llm = torch.randn(len(names), 16, generator=torch.Generator().manual_seed(1)) * 3.0
    provenance = VectorProvenance(model_id="minilm+ssft:x", model_hash="h", pooling="mean", template="t")
    save_vectors(str(tmp_path / "fields.safetensors"), llm, names, provenance.for_schema(schema))

    out = random_field_vectors(str(tmp_path / "fields.safetensors"), str(tmp_path / "random.safetensors"))
    control = load_vectors(out, schema=schema)  # still bound to the schema: the trainer accepts it
    assert control.keys == names and control.vectors.shape == llm.shape
    assert "random" in control.provenance.model_id and control.provenance.model_hash != "h"
    assert not torch.allclose(control.vectors, llm)
    assert abs(control.vectors.std().item() - llm.std().item()) < 0.5 * llm.std().item()  # the LLM vectors' spread
    again = random_field_vectors(str(tmp_path / "fields.safetensors"), str(tmp_path / "random2.safetensors"))
    assert torch.equal(load_vectors(again).vectors, control.vectors)  # seeded


def test_llactr_quick_keeps_an_explicit_ssft_budget(tmp_path) -> None:
    """``experiments.llactr --quick --ssft-budget 3 2 1`` used to tune SSFT on --quick's (16, 8, 1)."""
    import json

    schema = make_schema(str(tmp_path / "data"))
    _, metrics = llm_steps(os.path.join(schema.root, "schema.json"), str(tmp_path / "work"), quick=True,
                           ssft_budget=(3, 2, 1))
    with open(metrics, encoding="utf-8") as handle:
        config = json.load(handle)["config"]
    assert (config["samples_train"], config["samples_valid"], config["epochs"]) == (3, 2, 1)


def test_llactr_encodes_again_when_the_ssft_step_was_tuned_again(tmp_path, capsys) -> None:
    """The SSFT output removed and tuned again (here with another budget) used to keep the field vectors
    of the old adapter: encode was skipped (its file and command unchanged), so the table reported the
    new SSFT beside runs on the old vectors."""
    import shutil

    from recsys_llm.semantics.ssft_adapter import read_adapter_info

    schema = make_schema(str(tmp_path / "data"))
    schema_path, work = os.path.join(schema.root, "schema.json"), str(tmp_path / "work")
    vectors, _ = llm_steps(schema_path, work, quick=True, ssft_budget=(3, 2, 1))
    old = load_vectors(vectors).provenance.model_id
    llm_steps(schema_path, work, quick=True, ssft_budget=(3, 2, 1))  # done: both steps skipped
    assert "[skip] semantics encode" in capsys.readouterr().out
    assert load_vectors(vectors).provenance.model_id == old

    shutil.rmtree(os.path.join(work, "ssft"))
    vectors, _ = llm_steps(schema_path, work, quick=True, ssft_budget=(4, 2, 1))
    tuned = read_adapter_info(os.path.join(work, "ssft", "adapter"))["adapter_hash"]
    assert "[stale]" in capsys.readouterr().out
    assert load_vectors(vectors).provenance.model_id.endswith(f"+ssft:{tuned}") and not old.endswith(tuned)


def test_elec_refuses_attached_vectors_of_an_llm_adapted_again(tmp_path) -> None:
    """The CTR-adapted LLM removed and adapted again (here on another sample) used to keep the splits
    with the old LLM's vectors attached: the export step was skipped (its done file and command
    unchanged), and so were the runs on them, under the new LLM's settings in the table."""
    import shutil

    import pytest

    from experiments.elec import llm_steps as elec_llm_steps
    from recsys_llm.data.synthetic import generate_synthetic

    generate_synthetic(str(tmp_path / "data"), 600, seed=0)
    schema, work = str(tmp_path / "data" / "schema.json"), str(tmp_path / "work")
    attached, _ = elec_llm_steps(schema, work, "entity", ["item_id"], 32)
    assert elec_llm_steps(schema, work, "entity", ["item_id"], 32)[0] == attached  # done: skipped
    shutil.rmtree(os.path.join(work, "ctr_llm"))
    with pytest.raises(SystemExit, match=r"attached/schema.json: the splits there carry vectors exported from another "
                                         r"CTR-adapted LLM \(weights_sha256 \w+\) than .*ctr_llm holds now "
                                         r"\(weights_sha256 \w+\).* delete .*vectors and .*attached"):
        elec_llm_steps(schema, work, "entity", ["item_id"], 48)


def test_the_synthetic_tables_ssft_prompts_keep_their_values(tmp_path) -> None:
    """The synthetic data's 12 fields make a prompt of ~126 MiniLM tokens before its value: at the
    ML-100K table's --max-length 128 almost every value was cut to a token or two, and the cut values
    collapsed to a few dozen distinct prompts, held out and tuned on alike."""
    from experiments.llactr import SSFT_BUDGET, SSFT_MAX_LENGTH
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.data.synthetic import generate_synthetic
    from recsys_llm.semantics.encoder import default_model_path
    from recsys_llm.semantics.model_loading import load_tokenizer
    from recsys_llm.semantics.ssft import SSFTConfig
    from recsys_llm.semantics.ssft_examples import build_examples, fit_prompts
    from recsys_llm.semantics.templates import PromptTemplates, select_fields

    generate_synthetic(str(tmp_path / "data"), 20_000, seed=0)
    schema = DatasetSchema.load(str(tmp_path / "data" / "schema.json"))
    fields = select_fields(schema)
    samples_train, samples_valid, _ = SSFT_BUDGET
    train, _ = build_examples(schema, fields, SSFTConfig(samples_train=samples_train, samples_valid=samples_valid))
    kept, shortened = fit_prompts(train, [f.name for f in fields], PromptTemplates(),
                                  load_tokenizer(default_model_path()), SSFT_MAX_LENGTH["synthetic"])
    assert shortened <= 0.01 * len(train), (shortened, len(train))
    assert len(kept) >= 0.99 * len(train)
