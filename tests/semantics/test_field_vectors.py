import argparse
import dataclasses
import json
import os

import pytest
import torch

from recsys_llm.cli import main
from recsys_llm.cli import semantics as semantics_cli
from recsys_llm.semantics.field_vectors import FieldVectorConfig, encode_field_vectors
from recsys_llm.semantics.store import (VectorProvenance, VectorProvenanceError, check_same_vectors_output,
                                         load_vectors, save_vectors)
from recsys_llm.semantics.templates import PromptTemplates
from tests.semantics.conftest import make_schema


def _run_cli(argv) -> int:
    parser = argparse.ArgumentParser()
    semantics_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


class TestFieldVectors:
    def test_untuned_vectors_with_provenance(self, tmp_path, tiny_llama_dir, tiny_schema) -> None:
        output = str(tmp_path / "fields.safetensors")
        stored = encode_field_vectors(FieldVectorConfig(model_path=tiny_llama_dir), tiny_schema, output)
        assert stored.keys == ["color", "city", "user_id", "price"]  # C1 has no description
        assert stored.vectors.shape == (4, 64)
        provenance = stored.provenance
        assert provenance.left_out == ["C1"] and provenance.pooling == "last_token"
        assert provenance.schema_fingerprint == tiny_schema.fingerprint()
        assert provenance.extra["texts"][0] == "color: colour of the item"
        again = encode_field_vectors(FieldVectorConfig(model_path=tiny_llama_dir), tiny_schema, output)
        torch.testing.assert_close(again.vectors, stored.vectors, atol=0, rtol=0)
        with pytest.raises(VectorProvenanceError, match="were made for schema 'tiny'"):
            load_vectors(output, schema=make_schema(str(tmp_path / "other"), name="other", descriptions=False))

    def test_the_provenance_records_the_field_template(self, tmp_path, tiny_bert_dir, tiny_schema) -> None:
        """Field vectors of another field template are other vectors: their file records the templates' id, so a
        reader expecting the default template refuses them."""
        from recsys_llm.semantics.templates import PromptTemplates

        default, other = PromptTemplates(), PromptTemplates(field="the field {name} holds {description}")
        for name, templates in (("default", default), ("other", other)):
            stored = encode_field_vectors(FieldVectorConfig(model_path=tiny_bert_dir, templates=templates), tiny_schema,
                                          str(tmp_path / f"{name}.safetensors"))
            assert stored.provenance.template == templates.template_id()
        assert default.template_id() != other.template_id()
        load_vectors(str(tmp_path / "default.safetensors"), expected={"template": default.template_id()})
        with pytest.raises(VectorProvenanceError, match="template="):
            load_vectors(str(tmp_path / "other.safetensors"), expected={"template": default.template_id()})

    def test_cli_tune_without_held_out_values_says_so(self, tmp_path, tiny_llama_dir, tiny_schema, capsys) -> None:
        """``--samples-valid 0`` printed 'accuracy nan -> nan' and left no plot without a word."""
        out_dir = str(tmp_path / "ssft")
        assert _run_cli(["semantics", "tune", "--schema", tiny_schema.root, "--model", tiny_llama_dir, "--output-dir",
                         out_dir, "--samples-train", "4", "--samples-valid", "0", "--epochs", "1"]) == 0
        err = capsys.readouterr().err
        assert "semantics tune: no held-out values (--samples-valid 0), so no field retrieval accuracy and no " \
               "field_retrieval.png; adapter: " in err and "nan" not in err
        assert not os.path.exists(os.path.join(out_dir, "field_retrieval.png"))

    def test_cli_tune_then_encode(self, tmp_path, tiny_llama_dir, tiny_schema, capsys) -> None:
        schema_path = os.path.join(tiny_schema.root, "schema.json")
        out_dir, output = str(tmp_path / "ssft"), str(tmp_path / "tuned.safetensors")
        assert _run_cli(["semantics", "tune", "--schema", schema_path, "--model", tiny_llama_dir, "--output-dir", out_dir,
                         "--samples-train", "8", "--samples-valid", "2", "--epochs", "1", "--lr", "3e-3"]) == 0
        captured = capsys.readouterr()
        summary = json.loads(captured.out)
        assert summary["epochs"] == 1 and summary["num_valid"] == 8
        assert (f"semantics tune: held-out field retrieval accuracy {summary['before']['accuracy']:.3f} -> "
                f"{summary['after']['accuracy']:.3f} (chance 0.250); adapter: {summary['adapter_dir']}") in captured.err
        # the tune's output directory named for its adapter/: the error points at the adapter inside
        with pytest.raises(FileNotFoundError, match=f"{os.path.join(out_dir, 'adapter')} is the adapter that tune "
                                                     "output directory holds"):
            _run_cli(["semantics", "encode", "--schema", schema_path, "--adapter", out_dir, "--output", output])
        assert _run_cli(["semantics", "encode", "--schema", schema_path, "--adapter", os.path.join(out_dir, "adapter"),
                         "--output", output]) == 0
        tuned = load_vectors(output, schema=tiny_schema)
        untuned = encode_field_vectors(FieldVectorConfig(model_path=tiny_llama_dir), tiny_schema, str(tmp_path / "u.st"))
        assert "+ssft:" in tuned.provenance.model_id and tuned.provenance.model_hash != untuned.provenance.model_hash
        assert tuned.keys == untuned.keys and not torch.allclose(tuned.vectors, untuned.vectors)
        # adapter weights copied over the tuned ones: another model hash, so no cached vector of the old ones
        from safetensors.torch import load_file, save_file

        from recsys_llm.semantics.ssft_adapter import load_tuned_encoder

        adapter = os.path.join(out_dir, "adapter")
        before = load_tuned_encoder(adapter, 4)[0].model_hash
        weights = os.path.join(adapter, "adapter_model.safetensors")
        save_file({k: v + 0.5 for k, v in load_file(weights).items()}, weights)
        assert load_tuned_encoder(adapter, 4)[0].model_hash != before
        # the adapter never saw C1: a schema that describes it (another data set) is refused
        import dataclasses

        from recsys_llm.data.schema import DatasetSchema

        other = DatasetSchema.load(schema_path)
        other.fields = [dataclasses.replace(f, description="campaign") if f.name == "C1" else f for f in other.fields]
        other_path = os.path.join(tiny_schema.root, "schema_other.json")
        other.save(other_path)
        with pytest.raises(ValueError, match=r"adapter: the SSFT adapter was tuned on the fields \[.*\], not on \['C1'\] "
                                             r"of schema 'tiny'; tune it on this schema"):
            _run_cli(["semantics", "encode", "--schema", other_path, "--adapter", os.path.join(out_dir, "adapter"),
                      "--output", str(tmp_path / "other.safetensors")])
        # a tuned field described otherwise since: its text is one the adapter never saw
        edited = DatasetSchema.load(schema_path)
        tuned_name = next(f.name for f in edited.fields if f.description)
        edited.fields = [dataclasses.replace(f, description="a new description") if f.name == tuned_name else f
                         for f in edited.fields]
        edited_path = os.path.join(tiny_schema.root, "schema_edited.json")
        edited.save(edited_path)
        with pytest.warns(UserWarning, match=rf"adapter: the SSFT adapter was tuned with other texts of the fields "
                                             rf"\['{tuned_name}'\] \(e\.g\. .*, now '{tuned_name}: a new description'\)"):
            _run_cli(["semantics", "encode", "--schema", edited_path, "--adapter", adapter,
                      "--output", str(tmp_path / "edited.safetensors")])
        # another template than the adapter's, asked for: encoded so, with the same warning (it was silent)
        with pytest.warns(UserWarning, match=r"adapter: the SSFT adapter was tuned with other texts of the fields .*"
                                             r"now '.* \(field\)'\): .*leave --field-template out"):
            _run_cli(["semantics", "encode", "--schema", schema_path, "--adapter", adapter, "--field-template",
                      "{name} (field)", "--output", str(tmp_path / "template.safetensors")])
        # settings the adapter fixes: refused when they differ (before the model loads), accepted when the same
        from recsys_llm.semantics import field_vectors

        def no_loading(*args, **kwargs):
            raise AssertionError("the model was loaded before the settings were checked")

        for option, value, tuned in (("--model", str(tmp_path), tiny_llama_dir), ("--pooling", "mean", "last_token"),
                                     ("--max-length", "7", "256")):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(field_vectors, "load_tuned_encoder", no_loading)
                with pytest.raises(ValueError, match=rf"^semantics encode {option} {value}: the SSFT adapter .* was "
                                                     rf"tuned with {option} {tuned}, which encode uses with it; leave "
                                                     rf"{option} out"):
                    _run_cli(["semantics", "encode", "--schema", schema_path, "--adapter", adapter, option, value,
                              "--output", str(tmp_path / "refused.safetensors")])
        assert not os.path.exists(tmp_path / "refused.safetensors")
        assert _run_cli(["semantics", "encode", "--schema", schema_path, "--adapter", adapter, "--model", tiny_llama_dir,
                         "--pooling", "last_token", "--max-length", "256", "--output", str(tmp_path / "same.st")]) == 0
        # the adapter given as the model is named as one
        with pytest.raises(FileNotFoundError, match=r"adapter: a PEFT adapter directory \(adapter_config.json\), not "
                                                    r"a model; an SSFT adapter goes to `semantics encode --adapter`"):
            _run_cli(["semantics", "encode", "--schema", schema_path, "--model", adapter, "--output", str(tmp_path / "m.st")])
        # the tuned encoder reads as the adapter's ssft.json says (its max length and pooling), not the untuned defaults
        from recsys_llm.semantics.ssft_adapter import SSFT_INFO_FILE

        with open(os.path.join(adapter, SSFT_INFO_FILE), encoding="utf-8") as handle:
            info = json.load(handle)
        with open(os.path.join(adapter, SSFT_INFO_FILE), "w", encoding="utf-8") as handle:
            json.dump({**info, "max_length": 48}, handle)
        encoder = load_tuned_encoder(adapter, 4)[0]
        assert (encoder.max_length, encoder.pooling) == (48, "last_token")
        # an adapter tuned before 2026-12-05 recorded the hash over every subfolder of the model: still its model
        from recsys_llm.semantics.model_dir import model_dir_fingerprint, model_dir_walk_fingerprint
        from tests.tiny_models import copy_model_dir

        model = copy_model_dir(tiny_llama_dir, tmp_path / "model_with_onnx")
        os.makedirs(os.path.join(model, "onnx"))
        with open(os.path.join(model, "onnx", "model.onnx_data.bin"), "w", encoding="utf-8") as handle:
            handle.write("x")
        assert model_dir_walk_fingerprint(model) != model_dir_fingerprint(model) == info["base_model_hash"]
        with open(os.path.join(adapter, SSFT_INFO_FILE), "w", encoding="utf-8") as handle:
            json.dump({**info, "base_model_hash": model_dir_walk_fingerprint(model)}, handle)
        encoder = load_tuned_encoder(adapter, 4, base_model_path=model)[0]
        assert encoder.model_hash.startswith(model_dir_fingerprint(model))


def test_settings_are_checked_when_the_config_is_made() -> None:
    with pytest.raises(ValueError, match=r"^FieldVectorConfig.batch_size \(semantics encode --batch-size\) must be an "
                                         r"integer >= 1, got 0$"):
        FieldVectorConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"^FieldVectorConfig.max_length \(semantics encode --max-length\)"):
        FieldVectorConfig(max_length=-5)
    with pytest.raises(ValueError, match=r"^FieldVectorConfig.pooling \(semantics encode --pooling\)"):
        FieldVectorConfig(pooling="max")


def test_an_output_directory_is_refused_before_the_model_loads(tmp_path, tiny_schema) -> None:
    """``output="runs/"`` for ``"runs/fields.safetensors"``: found only at the rename, after every field was encoded."""
    config = FieldVectorConfig(model_path=str(tmp_path / "no-such-model"))  # never loaded
    with pytest.raises(ValueError, match=r"is a directory; give the path of the field-vector file to write, "
                                         r"e.g. .*fields.safetensors"):
        encode_field_vectors(config, tiny_schema, str(tmp_path))


def test_an_adapter_of_other_fields_is_refused_before_the_model_loads(tmp_path, tiny_schema, monkeypatch) -> None:
    """The check only needs the adapter's ssft.json; it used to come after the LLM had loaded."""
    from recsys_llm.semantics import field_vectors
    from recsys_llm.semantics.ssft_adapter import SSFT_INFO_FILE

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    info = {"base_model_path": str(tmp_path / "base"), "base_model_hash": "b", "adapter_hash": "a",
            "pooling": "last_token", "max_length": 64, "fields": ["color", "city"], "templates": {}}
    (adapter / SSFT_INFO_FILE).write_text(json.dumps(info), encoding="utf-8")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter's fields were checked")

    monkeypatch.setattr(field_vectors, "load_tuned_encoder", no_loading)
    with pytest.raises(ValueError, match=r"the SSFT adapter was tuned on the fields \['color', 'city'\], not on "
                                         r"\['user_id', 'price'\] of schema 'tiny'"):
        encode_field_vectors(FieldVectorConfig(adapter_dir=str(adapter)), tiny_schema, str(tmp_path / "f.safetensors"))


def _random_lora_adapter(base: str, adapter: str, **info) -> None:
    """A LoRA adapter of the model ``base`` with random B (as tuned: B starts at zero, which would leave the base
    model as it is) saved at ``adapter``, with its ssft.json (``info`` over a minimal record)."""
    from peft import LoraConfig, get_peft_model

    from recsys_llm.semantics.model_dir import model_dir_fingerprint
    from recsys_llm.semantics.model_loading import load_model
    from recsys_llm.semantics.ssft_adapter import SSFT_INFO_FILE

    torch.manual_seed(0)
    model = get_peft_model(load_model(base, torch.device("cpu"), torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    model.save_pretrained(adapter)
    record = {"base_model_path": base, "base_model_hash": model_dir_fingerprint(base), "adapter_hash": "a1",
              "pooling": "last_token", "max_length": 64, "fields": [], "templates": {}, **info}
    with open(os.path.join(adapter, SSFT_INFO_FILE), "w", encoding="utf-8") as handle:
        json.dump(record, handle)


def test_an_edited_adapter_config_misses_the_encode_cache(tmp_path, tiny_llama_dir) -> None:
    """peft merges the adapter's weights scaled by adapter_config.json's lora_alpha / r: a config edited or
    copied over the tuned one (same weights) encodes other vectors, which must not hit the cached ones."""
    from recsys_llm.semantics.ssft_adapter import load_tuned_encoder
    from recsys_llm.semantics.store import cached_encode
    from tests.tiny_models import SAMPLE_TEXTS

    adapter = str(tmp_path / "adapter")
    _random_lora_adapter(tiny_llama_dir, adapter)
    cache = str(tmp_path / "cache")
    tuned = cached_encode(load_tuned_encoder(adapter)[0], SAMPLE_TEXTS, "t", cache, progress=False)
    config_path = os.path.join(adapter, "adapter_config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump({**config, "lora_alpha": 32}, handle)
    encoder = load_tuned_encoder(adapter)[0]
    expected = encoder.encode(SAMPLE_TEXTS, progress=False)
    assert not torch.allclose(expected, tuned)
    torch.testing.assert_close(cached_encode(encoder, SAMPLE_TEXTS, "t", cache, progress=False), expected,
                               atol=0, rtol=0)


def test_the_order_of_the_target_modules_in_adapter_config_keeps_the_model_hash(tmp_path, tiny_llama_dir) -> None:
    """peft writes target_modules, a set, in Python's hash order (PYTHONHASHSEED): the same adapter saved by
    two processes must give one model hash (one cache entry, vectors a resumed train run takes as its own)."""
    from recsys_llm.semantics.ssft_adapter import load_tuned_encoder

    adapter = str(tmp_path / "adapter")
    _random_lora_adapter(tiny_llama_dir, adapter)
    config_path = os.path.join(adapter, "adapter_config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    hashes = []
    for modules in (["q_proj", "v_proj"], ["v_proj", "q_proj"]):
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump({**config, "target_modules": modules}, handle)
        hashes.append(load_tuned_encoder(adapter)[0].model_hash)
    assert hashes[0] == hashes[1]


def test_vectors_encoded_at_another_max_length_are_named_as_other_vectors(tmp_path, tiny_llama_dir, tiny_schema) -> None:
    """Texts cut at another length give other vectors from the same model: a run's record must tell them
    apart (a resume, evaluate or a reused experiment run would take them as the vectors it trained with)."""
    from recsys_llm.train.run_records import changed_field_vectors

    records = {}
    for max_length in (4, 256):
        stored = encode_field_vectors(FieldVectorConfig(model_path=tiny_llama_dir, max_length=max_length), tiny_schema,
                                      str(tmp_path / f"v{max_length}.safetensors"))
        records[max_length] = {"llactr": stored.provenance.to_dict()}
    assert records[4]["llactr"]["max_length"] == 4
    assert changed_field_vectors(records[4], records[256]) == ["max_length"]
    # a run that trained with a file of an older version (no schema_contents), the same vectors written again now
    older = {"llactr": {**records[4]["llactr"], "schema_contents": {}}}
    assert changed_field_vectors(older, records[4]) == []


def test_an_adapter_whose_base_model_moved_encodes_with_model_naming_where_it_is(tmp_path, tiny_llama_dir,
                                                                                  tiny_schema) -> None:
    """An adapter copied to another machine, or whose base model moved (MiniLM in another venv), could not encode:
    without --model its recorded base path was not found, and --model naming the same files at their new path was
    refused as another model. The files are what is compared (their hash), as resume does."""
    import dataclasses
    import shutil

    from recsys_llm.semantics.templates import PromptTemplates
    from tests.tiny_models import copy_model_dir, save_tiny_bert

    base = copy_model_dir(tiny_llama_dir, tmp_path / "venv_a_model")
    adapter = str(tmp_path / "adapter")
    _random_lora_adapter(base, adapter, fields=["color", "city", "user_id", "price"],
                         templates=dataclasses.asdict(PromptTemplates()))
    schema_path = os.path.join(tiny_schema.root, "schema.json")
    encode = ["semantics", "encode", "--schema", schema_path, "--adapter", adapter]
    assert _run_cli([*encode, "--output", str(tmp_path / "before.safetensors")]) == 0
    moved = str(tmp_path / "venv_b_model")
    shutil.move(base, moved)
    with pytest.raises(FileNotFoundError, match=r"is not there; if it moved .* give its directory now "
                                                r"\(semantics encode --model\)"):
        _run_cli([*encode, "--output", str(tmp_path / "after.safetensors")])
    assert _run_cli([*encode, "--model", moved, "--output", str(tmp_path / "after.safetensors")]) == 0
    before, after = (load_vectors(str(tmp_path / f"{name}.safetensors"), schema=tiny_schema) for name in ("before", "after"))
    torch.testing.assert_close(after.vectors, before.vectors, atol=0, rtol=0)
    assert after.provenance.model_hash == before.provenance.model_hash
    other = save_tiny_bert(str(tmp_path / "other_model"))  # other files: still refused
    with pytest.raises(ValueError, match=r"--model .*other_model: the SSFT adapter .* was tuned with --model"):
        _run_cli([*encode, "--model", other, "--output", str(tmp_path / "other.safetensors")])


def test_a_field_text_of_exactly_max_length_tokens_is_not_cut(tiny_llama_dir) -> None:
    import warnings

    from recsys_llm.semantics.encoder import TextEncoder, check_field_texts_fit

    text = "shade town " * 5 + "colour"
    tokens = len(TextEncoder(tiny_llama_dir).tokenizer([text], truncation=False)["input_ids"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_field_texts_fit(TextEncoder(tiny_llama_dir, max_length=tokens), ["color", "city"], [text, "a city"],
                              "semantics encode", refuse_alike=True)
    with pytest.warns(UserWarning, match=r"the text of field\(s\) \['color'\] is longer than max_length"):
        check_field_texts_fit(TextEncoder(tiny_llama_dir, max_length=tokens - 1), ["color", "city"],
                              [text, "a city"], "semantics encode", refuse_alike=True)


def test_field_texts_cut_at_max_length_or_alike_are_named(tmp_path, tiny_llama_dir) -> None:
    """Long field texts were cut without a word, and texts alike as the encoder reads them gave one vector."""
    import dataclasses

    from recsys_llm.semantics.templates import PromptTemplates

    schema = make_schema(str(tmp_path / "data"))
    shared = "shade town " * 20
    schema.fields[0] = dataclasses.replace(schema.fields[0], description=shared + "colour")
    schema.fields[1] = dataclasses.replace(schema.fields[1], description=shared + "city")
    config = FieldVectorConfig(model_path=tiny_llama_dir, max_length=16,
                               templates=PromptTemplates(field="{description} {name}"))
    with pytest.warns(UserWarning) as caught:
        stored = encode_field_vectors(config, schema, str(tmp_path / "fields.safetensors"))
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("semantics encode: the text of field(s) ['color', 'city'] is longer than max_length 16 "
                            "tokens") for m in messages), messages
    alike = [m for m in messages if m.startswith("semantics encode: fields 'color' and 'city' have texts that are "
                                                 "the same 16 tokens")]
    # both cut: the way out is a longer max_length (the template holds {name} already)
    assert alike and "raise --max-length (their texts are" in alike[0] and "differ past the first 16)" in alike[0]
    assert torch.equal(stored.vectors[0], stored.vectors[1])  # what the warning says


def test_encode_prints_a_summary_that_names_each_field_once(tmp_path, tiny_schema, tiny_bert_dir, capsys) -> None:
    """The summary lists the fields and the provenance without the schema's own copy (kept in the file)."""
    output = str(tmp_path / "f.safetensors")
    assert main(["semantics", "encode", "--schema", tiny_schema.root, "--model", tiny_bert_dir,
                 "--output", output]) == 0
    summary = json.loads(capsys.readouterr().out)
    stored = load_vectors(output)
    assert summary["fields"] == stored.keys and summary["shape"] == list(stored.vectors.shape)
    assert summary["provenance"]["schema_fingerprint"] == stored.provenance.schema_fingerprint
    assert not {"schema_fields", "schema_contents", "extra"} & set(summary["provenance"])
    assert stored.provenance.schema_contents and stored.provenance.schema_fields  # the file keeps them


def test_encoded_field_vectors_load_under_a_schema_whose_tables_grew(tmp_path, tiny_schema, tiny_bert_dir) -> None:
    """`semantics encode` records the fingerprint of what field vectors depend on (names, kinds, descriptions,
    their order, the label); a table grown since (more users, more hash buckets) keeps it, another text does not."""
    import dataclasses

    output = str(tmp_path / "fields.safetensors")
    stored = encode_field_vectors(FieldVectorConfig(model_path=tiny_bert_dir), tiny_schema, output)
    assert stored.provenance.schema_semantic_fingerprint == tiny_schema.semantic_fingerprint()
    grown = dataclasses.replace(tiny_schema, fields=[
        dataclasses.replace(f, cardinality=f.cardinality * 10) if f.name in ("user_id", "C1") else f
        for f in tiny_schema.fields])
    assert grown.fingerprint() != tiny_schema.fingerprint()
    again = load_vectors(output, schema=grown)
    assert again.keys == stored.keys
    torch.testing.assert_close(again.vectors, stored.vectors, atol=0, rtol=0)
    described = dataclasses.replace(grown, fields=[
        dataclasses.replace(f, description="town of the user") if f.name == "city" else f for f in grown.fields])
    with pytest.raises(VectorProvenanceError, match=r"\(city: description 'city of the user' -> 'town of the user'\)\. "
                                                    r"Re-encode them for this schema"):
        load_vectors(output, schema=described)


@pytest.mark.parametrize("name", ["override_templates", "include_fields_without_description", "trust_remote_code"])
def test_switches_are_bools(name):
    """FieldVectorConfig(trust_remote_code="false") would have run the model directory's own code."""
    with pytest.raises(ValueError, match=rf"FieldVectorConfig\.{name}: expected true or false, got 'false'"):
        FieldVectorConfig(**{name: "false"})


def test_field_vector_config_refuses_non_string_settings():
    from recsys_llm.semantics.field_vectors import FieldVectorConfig

    with pytest.raises(ValueError, match=r"FieldVectorConfig.device: expected a string or None, got 0"):
        FieldVectorConfig(device=0)
    with pytest.raises(ValueError, match=r"FieldVectorConfig.adapter_dir: expected a string or None, got True"):
        FieldVectorConfig(adapter_dir=True)


def test_vectors_of_another_llm_are_not_written_over_an_earlier_llms(tmp_path, tiny_schema, tiny_bert_dir,
                                                                     tiny_llama_dir) -> None:
    """An LLM upgrade re-ran `semantics encode --output runs/fields.safetensors` with the new model: the file the
    earlier runs trained with was replaced, and those runs could no longer resume, evaluate or export (their
    refusal asked for the file that was gone). The same model encodes again over its own file."""
    output = str(tmp_path / "fields.safetensors")
    earlier = encode_field_vectors(FieldVectorConfig(model_path=tiny_bert_dir), tiny_schema, output)
    encode_field_vectors(FieldVectorConfig(model_path=tiny_bert_dir), tiny_schema, output)  # its own file
    with pytest.raises(FileExistsError, match=r"holds other field vectors .*differing: model_hash.* delete the file"):
        encode_field_vectors(FieldVectorConfig(model_path=tiny_llama_dir), tiny_schema, output)
    other_template = FieldVectorConfig(model_path=tiny_bert_dir, templates=PromptTemplates(field="{description} {name}"))
    with pytest.raises(FileExistsError, match=r"differing: template, texts\)"):  # the same LLM, other texts
        encode_field_vectors(other_template, tiny_schema, output)
    kept = load_vectors(output)
    assert kept.provenance.model_hash == earlier.provenance.model_hash
    torch.testing.assert_close(kept.vectors, earlier.vectors, atol=0, rtol=0)
    grown = dataclasses.replace(tiny_schema, fields=[  # a table grew: the same fields' texts, the same vectors
        dataclasses.replace(spec, cardinality=spec.cardinality + 10) if spec.is_categorical else spec
        for spec in tiny_schema.fields])
    assert grown.fingerprint() != tiny_schema.fingerprint()
    replaced = encode_field_vectors(FieldVectorConfig(model_path=tiny_bert_dir), grown, output)
    assert replaced.provenance.schema_fingerprint == grown.fingerprint()


def test_vectors_of_the_next_days_schema_are_not_written_over_the_earlier_days(tmp_path, tiny_schema, tiny_bert_dir,
                                                                               monkeypatch) -> None:
    """A day that brings a new field needs field vectors of its own: the same LLM re-encoding them into day 1's
    file replaced it, and day 1's run could no longer evaluate, export or resume (its refusal then asked to
    re-encode). Refused before the model loads; the same fields encode again over their own file."""
    from recsys_llm.data.schema import FieldSpec
    from recsys_llm.semantics import field_vectors

    output = str(tmp_path / "fields.safetensors")
    earlier = encode_field_vectors(FieldVectorConfig(model_path=tiny_bert_dir), tiny_schema, output)
    encode_field_vectors(FieldVectorConfig(model_path=tiny_bert_dir), tiny_schema, output)  # its own fields
    day2 = dataclasses.replace(tiny_schema, fields=[*tiny_schema.fields, FieldSpec(
        "seller", "sparse", cardinality=10, description="seller of the item")])

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(field_vectors, "build_field_encoder", no_model)
    with pytest.raises(FileExistsError, match=r"other fields than schema 'tiny' has \(added \['seller'\]; .* "
                                              r"another --output .* delete the file first"):
        encode_field_vectors(FieldVectorConfig(model_path=tiny_bert_dir), day2, output)
    kept = load_vectors(output, schema=tiny_schema)
    torch.testing.assert_close(kept.vectors, earlier.vectors, atol=0, rtol=0)
    monkeypatch.undo()
    stored = encode_field_vectors(FieldVectorConfig(model_path=tiny_bert_dir), day2, str(tmp_path / "day2.safetensors"))
    assert stored.keys[-1] == "seller"


def test_vectors_of_another_dtype_or_other_left_out_fields_are_other_vectors_and_older_files_entries_are_not(
        tmp_path, tiny_schema) -> None:
    """``check_same_vectors_output``: vectors encoded in another dtype, or leaving out other fields, are other
    vectors and not written over the file (guards a dropped ``dtype`` / ``left_out`` identity entry); an entry the
    earlier file lacks (``max_length``, written before it was recorded) is not compared, so the same vectors
    replace it (guards comparing a missing entry as a difference)."""
    output = str(tmp_path / "fields.safetensors")
    names = [spec.name for spec in tiny_schema.fields]
    earlier = VectorProvenance(model_id="m", model_hash="h", pooling="mean", template="t", left_out=[],
                               extra={"texts": names, "dtype": "float32"}).for_schema(tiny_schema)
    save_vectors(output, torch.zeros(len(names), 4), names, earlier)
    check_same_vectors_output(output, dataclasses.replace(earlier, max_length=16))  # older file: no max_length
    with pytest.raises(FileExistsError, match=r"differing: dtype\)"):
        check_same_vectors_output(output, dataclasses.replace(earlier, extra={"texts": names, "dtype": "bfloat16"}))
    with pytest.raises(FileExistsError, match=r"differing: left_out\)"):
        check_same_vectors_output(output, dataclasses.replace(earlier, left_out=[names[0]]))
