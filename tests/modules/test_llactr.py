import dataclasses

import pytest
import torch
from torchrec.models.dlrm import DLRM

from recsys_llm.data.batch import Batch
from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.models.task import CTRTask
from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
from recsys_llm.modules.field_semantics import FieldRepresentationEnhancement
from recsys_llm.modules.llactr import LLaCTRConfig, build_llactr_terms
from recsys_llm.semantics.store import VectorProvenance, VectorProvenanceError, save_vectors
from tests.modules.llactr_helpers import LinearBackbone, make_ebc, make_kjt


def _schema(name: str = "toy", genre_text: str = "genre of the item") -> DatasetSchema:
    return DatasetSchema(name=name, fields=[
        FieldSpec("user_id", cardinality=20, description="user id"),
        FieldSpec("item_id", cardinality=20, description="item id"),
        FieldSpec("genre", cardinality=20, description=genre_text),
        FieldSpec("price", "dense", description="price"),
    ])


def _vectors(tmp_path, schema: DatasetSchema) -> str:
    path = str(tmp_path / "fields.safetensors")
    provenance = VectorProvenance(model_id="tiny", model_hash="h", pooling="mean", template="{name}: {description}")
    torch.manual_seed(0)
    save_vectors(path, torch.randn(4, 12), ["user_id", "genre", "item_id", "price"], provenance.for_schema(schema))
    return path


class TestBuildLLaCTRTerms:
    def test_terms_train_inside_ctr_task(self, tmp_path) -> None:
        schema = _schema()
        config = LLaCTRConfig.from_dict({"vectors_path": _vectors(tmp_path, schema), "lambda_fre": 0.2, "lambda_fie": 0.05})
        backbone = LinearBackbone(make_ebc(dim=8), num_dense_features=1)
        logit_terms, loss_terms, provenance = build_llactr_terms(config, schema, backbone)
        assert isinstance(logit_terms["fie"], FieldInteractionEnhancement)
        assert isinstance(loss_terms["fre"], FieldRepresentationEnhancement)
        assert loss_terms["fre"].feature_names == ["user_id", "genre", "item_id"]  # vector-file order
        assert provenance["fields_skipped"] == ["price"] and provenance["schema_fingerprint"] == schema.fingerprint()
        task = CTRTask(backbone, logit_terms=logit_terms, loss_terms=loss_terms)
        batch = Batch(torch.randn(4, 1), make_kjt(), torch.tensor([0.0, 1.0, 1.0, 0.0]))
        plain = CTRTask(backbone)
        loss, (_, logits, _) = task(batch)
        plain_loss, (_, plain_logits, _) = plain(batch)
        fie_logit = logit_terms["fie"](backbone(batch.dense_features, batch.sparse_features))
        torch.testing.assert_close(logits, plain_logits + fie_logit)
        assert loss > plain_loss  # FRE adds a positive KL term
        loss.backward()
        assert loss_terms["fre"].projection.weight.grad is not None
        assert logit_terms["fie"].pair_weight.weight.grad is not None

    def test_each_lambda_weighs_its_own_term(self, tmp_path) -> None:
        """llactr.lambda_fre weighs FRE's KL and llactr.lambda_fie FIE's pair sum, each its own (not the other's)."""
        schema = _schema()
        config = LLaCTRConfig(_vectors(tmp_path, schema), lambda_fre=0.2, lambda_fie=0.05)
        logit_terms, loss_terms, _ = build_llactr_terms(config, schema, LinearBackbone(make_ebc(dim=8), 1))
        fie, fre = logit_terms["fie"], loss_terms["fre"]
        torch.manual_seed(0)
        kt = make_ebc(dim=8)(make_kjt())
        names, vectors = fie.feature_names, fre.field_vectors  # the same fields, in the vector file's order
        pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
        similarity = torch.stack([torch.cosine_similarity(vectors[i], vectors[j], dim=0) for i, j in pairs])
        w = fie.pair_weight.weight @ similarity + fie.pair_weight.bias
        pair_sum = sum(w[p] * (kt[names[i]] * kt[names[j]]).sum(-1) for p, (i, j) in enumerate(pairs))
        torch.testing.assert_close(fie.logit(kt), 0.05 * pair_sum, rtol=1e-5, atol=1e-6)
        kl = 0.0
        for f, name in enumerate(fre.feature_names):  # KL summed over fields (fre_field_reduction "sum"), batch mean
            p = torch.softmax(fre.projection(vectors[f]), dim=-1)
            kl = kl + (p * (p.log() - torch.log_softmax(kt[name], dim=-1))).sum(-1).mean()
        torch.testing.assert_close(fre.loss(kt), 0.2 * kl)

    def test_building_the_terms_leaves_the_random_stream_to_the_backbone(self, tmp_path, monkeypatch) -> None:
        # the tables are materialised after the terms are built (by DMP, from meta): terms that drew their
        # initial weights from the global stream gave lambda 0 (or FIE-only vs FRE + FIE) other tables
        # than the plain model of the same seed; nor may a GPU's stream (tables on GPU draw from it) be reseeded
        def reseeds(seed):
            raise AssertionError("a GPU's random stream was reseeded")

        schema = _schema()
        path = _vectors(tmp_path, schema)
        backbone = LinearBackbone(make_ebc(dim=8), num_dense_features=1)
        weights = {}
        for switches in ({}, {"use_fre": False}, {"use_fie": False}, {"lambda_fre": 0.0, "lambda_fie": 0.0}):
            torch.manual_seed(3)
            with monkeypatch.context() as patched:
                patched.setattr(torch.cuda, "manual_seed_all", reseeds)
                logit_terms, loss_terms, _ = build_llactr_terms(LLaCTRConfig(path, **switches), schema, backbone)
            after = torch.rand(4)
            torch.manual_seed(3)
            torch.testing.assert_close(after, torch.rand(4), rtol=0, atol=0)  # the stream did not move
            for name, term in {**logit_terms, **loss_terms}.items():
                weights.setdefault(name, []).append(next(term.parameters()).detach().clone())
        for name, drawn in weights.items():  # FIE's weights do not depend on whether FRE is built, and back
            assert all(torch.equal(drawn[0], other) for other in drawn[1:]), name
        with torch.device("meta"):  # an ambient default device still takes the terms (built on CPU, then moved)
            logit_terms, loss_terms, _ = build_llactr_terms(LLaCTRConfig(path), schema, backbone)
        assert logit_terms["fie"].pair_weight.weight.is_meta and loss_terms["fre"].projection.weight.is_meta

    def test_terms_built_under_the_meta_device_hold_the_files_vectors(self, tmp_path) -> None:
        """Under an ambient ``torch.device("meta")`` the fields' vectors were picked with a meta index, which
        selected uninitialised memory (now and then NaN, refused; else garbage), and the terms' constants were moved
        to meta, where DMP zero-fills them; they stay on CPU with the file's values, the weights on meta."""
        schema = _schema()
        path = _vectors(tmp_path, schema)
        backbone = LinearBackbone(make_ebc(dim=8), num_dense_features=1)
        reference_logit, reference_loss, _ = build_llactr_terms(LLaCTRConfig(path), schema, backbone)
        for device in (None, torch.device("cpu")):
            with torch.device("meta"):
                logit_terms, loss_terms, _ = build_llactr_terms(LLaCTRConfig(path), schema, backbone, device)
            for name, term in {**logit_terms, **loss_terms}.items():
                expected = {**reference_logit, **reference_loss}[name]
                for key, buffer in term.named_buffers():
                    assert buffer.device.type == "cpu", (device, name, key)
                    assert torch.equal(buffer, dict(expected.named_buffers())[key]), (device, name, key)
                assert all(param.is_meta == (device is None) for param in term.parameters()), (device, name)

    def test_ablation_switches_and_dlrm(self, tmp_path) -> None:
        schema = _schema()
        path = _vectors(tmp_path, schema)
        dlrm = DLRM(make_ebc(dim=8), dense_in_features=1, dense_arch_layer_sizes=[8], over_arch_layer_sizes=[4, 1])
        logit_terms, loss_terms, _ = build_llactr_terms(LLaCTRConfig(path, use_fie=False), schema, dlrm)
        assert not logit_terms and set(loss_terms) == {"fre"}
        logit_terms, loss_terms, _ = build_llactr_terms(LLaCTRConfig(path, use_fre=False), schema, dlrm)
        assert set(logit_terms) == {"fie"} and not loss_terms
        kt = dlrm.sparse_arch.embedding_bag_collection(make_kjt())
        assert logit_terms["fie"].logit(kt).shape == (4,)

    def test_a_task_is_read_through_its_backbone_and_a_module_without_an_ebc_is_named(self, tmp_path) -> None:
        from recsys_llm.modules.teacher_student import TeacherStudentConfig, TeacherStudentTask

        schema = _schema()
        path = _vectors(tmp_path, schema)
        task = CTRTask(LinearBackbone(make_ebc(dim=8), num_dense_features=1))
        _, loss_terms, _ = build_llactr_terms(LLaCTRConfig(path, use_fie=False), schema, task)
        assert loss_terms["fre"].feature_names == ["user_id", "genre", "item_id"]
        pair = TeacherStudentTask(CTRTask(LinearBackbone(make_ebc(dim=8), 1)), task, TeacherStudentConfig(beta=0))
        with pytest.raises(ValueError, match=r"TeacherStudentTask: found no EmbeddingBagCollection at "
                                             r"\.embedding_bag_collection, .*; pass the backbone whose embeddings the "
                                             r"terms read \(a TeacherStudentTask's student.model\), or the EBC itself"):
            build_llactr_terms(LLaCTRConfig(path), schema, pair)

    @pytest.mark.parametrize("switches", [{}, {"use_fre": False}, {"use_fie": False}])
    def test_fields_of_several_dims_are_refused_when_built(self, tmp_path, switches) -> None:
        """FIE pairs and FRE compares the fields' embeddings: both need one dim, known at build time."""
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        schema = _schema()
        ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"t_{f}", embedding_dim=16 if f == "user_id" else 8, num_embeddings=20, feature_names=[f])
            for f in ("user_id", "item_id", "genre")])
        with pytest.raises(ValueError, match=r"need one dim; the fields with vectors have \{'user_id': 16, 'genre': 8, "
                                             r"'item_id': 8\}"):
            build_llactr_terms(LLaCTRConfig(_vectors(tmp_path, schema), **switches), schema, ebc)
        # llactr.fields picks the fields of one dim
        logit_terms, loss_terms, provenance = build_llactr_terms(
            LLaCTRConfig(_vectors(tmp_path, schema), fields=["item_id", "genre"], **switches), schema, ebc)
        for term in [*logit_terms.values(), *loss_terms.values()]:
            assert term.feature_names == ["genre", "item_id"]  # vector-file order
        assert provenance["fields_used"] == ["genre", "item_id"] and provenance["fields_skipped"] == ["user_id", "price"]
        with pytest.raises(ValueError, match=r"llactr.fields: \['price', 'nope'\] are not both in .* and embedded"):
            build_llactr_terms(LLaCTRConfig(_vectors(tmp_path, schema), fields=["item_id", "price", "nope"]), schema, ebc)
        # a field the encode left out for want of a description: said so (it is embedded by the model)
        path = str(tmp_path / "without_genre.safetensors")
        provenance = VectorProvenance(model_id="tiny", model_hash="h", pooling="mean", template="t", left_out=["genre"])
        save_vectors(path, torch.randn(2, 12), ["user_id", "item_id"], provenance.for_schema(schema))
        with pytest.raises(ValueError, match=r"`semantics encode` left out \['genre'\] \(no description in the schema\)"):
            build_llactr_terms(LLaCTRConfig(path, fields=["genre", "item_id"]), schema, ebc)

    @pytest.mark.parametrize("normalize", [False, True])
    def test_each_term_takes_the_vectors_of_its_own_fields(self, tmp_path, normalize) -> None:
        """The terms' rows are the file's rows of the fields they use (file order user_id, genre, item_id, price)."""
        from recsys_llm.semantics.store import load_vectors

        schema = _schema()
        path = _vectors(tmp_path, schema)
        stored = load_vectors(path)
        rows = stored.vectors[[stored.keys.index("genre"), stored.keys.index("item_id")]]  # (2, 12)
        config = LLaCTRConfig(path, fields=["item_id", "genre"], normalize_vectors=normalize)
        logit_terms, loss_terms, _ = build_llactr_terms(config, schema, LinearBackbone(make_ebc(), 1))
        fre_rows = torch.nn.functional.normalize(rows, dim=-1) if normalize else rows
        torch.testing.assert_close(loss_terms["fre"].field_vectors, fre_rows)
        cosine = torch.nn.functional.cosine_similarity(rows[0], rows[1], dim=0)
        torch.testing.assert_close(logit_terms["fie"].pair_similarity, cosine.reshape(1))  # cosine either way

    def test_a_missing_vector_file_and_one_field_for_fie_are_refused_with_what_to_do(self, tmp_path) -> None:
        schema = _schema()
        backbone = LinearBackbone(make_ebc(), 1)
        with pytest.raises(FileNotFoundError, match=r"moved.safetensors: vector file not found \(llactr.vectors_path\); "
                                                    r"if it moved, pass its new path as llactr.vectors_path=PATH"):
            build_llactr_terms(LLaCTRConfig(str(tmp_path / "moved.safetensors")), schema, backbone)
        path = _vectors(tmp_path, schema)
        with pytest.raises(ValueError, match=r"FIE pairs fields, and only \['genre'\] of .* is embedded by the model "
                                             r"\(features .*\) and wanted; use FRE alone \(llactr.use_fie=false\)"):
            build_llactr_terms(LLaCTRConfig(path, fields=["genre"]), schema, backbone)
        _, loss_terms, _ = build_llactr_terms(LLaCTRConfig(path, fields=["genre"], use_fie=False), schema, backbone)
        assert loss_terms["fre"].feature_names == ["genre"]

    def test_fie_over_more_fields_than_memory_holds_is_refused_naming_its_size(self, tmp_path, monkeypatch) -> None:
        """FIE's Linear(P, P) grows as F^4: over 500 fields it asked torch's allocator for 62 GB, which failed
        without naming FIE (or the process was killed at the first optimizer step)."""
        from recsys_llm.modules import llactr
        from recsys_llm.modules.llactr import check_fie_fits

        monkeypatch.setattr(llactr, "host_memory", lambda: 64 << 30)  # a host of 64 GiB
        check_fie_fits(100)  # 24.5 million weights
        with pytest.raises(ValueError, match=r"FIE over 500 fields learns a Linear\(P, P\) on their P = 124,750 "
                                             r"field pairs: 15,562,562,500 weights, about 231.9 GiB while training "
                                             r".* over the host's 64.0 GiB; .* llactr.fields .* llactr.use_fie=false"):
            check_fie_fits(500)
        schema = _schema()
        path = _vectors(tmp_path, schema)
        backbone = LinearBackbone(make_ebc(), 1)
        monkeypatch.setattr(llactr, "host_memory", lambda: 100)  # 3 fields, 3 pairs: 192 bytes
        with pytest.raises(ValueError, match=r"FIE over 3 fields .* P = 3 field pairs"):
            build_llactr_terms(LLaCTRConfig(path), schema, backbone)
        _, loss_terms, _ = build_llactr_terms(LLaCTRConfig(path, use_fie=False), schema, backbone)
        assert list(loss_terms) == ["fre"]
        monkeypatch.setattr(llactr, "host_memory", lambda: None)  # the OS does not say: no check
        assert "fie" in build_llactr_terms(LLaCTRConfig(path), schema, backbone)[0]

    def test_fie_size_counts_the_weight_and_bias_four_times_in_float32(self, monkeypatch) -> None:
        """3 fields, P = 3 pairs: Linear(3, 3) holds 9 weights and 3 biases, 4 copies of 4 bytes: 192 bytes."""
        from recsys_llm.modules import llactr

        monkeypatch.setattr(llactr, "host_memory", lambda: 192)
        llactr.check_fie_fits(3)
        monkeypatch.setattr(llactr, "host_memory", lambda: 191)
        with pytest.raises(ValueError, match=r"FIE over 3 fields .* P = 3 field pairs: 9 weights"):
            llactr.check_fie_fits(3)
        monkeypatch.setattr(llactr, "host_memory", lambda: 2 * 192)
        llactr.check_fie_fits(3)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # three ranks on the host, a copy each: 128 bytes for one
        with pytest.raises(ValueError, match=r"over the host's 0.0 GiB, shared by 3 ranks; "):
            llactr.check_fie_fits(3)

    def test_vectors_of_another_schema_are_rejected_naming_what_differs(self, tmp_path) -> None:
        path = _vectors(tmp_path, _schema())
        changed = _schema(genre_text="main genre")
        with pytest.raises(VectorProvenanceError, match="were made for schema 'toy' .*current schema 'toy' has "
                                                        r"field-vector fingerprint .*\(genre: description "
                                                        r"'genre of the item' -> 'main genre'\)"):
            build_llactr_terms(LLaCTRConfig(path), changed, LinearBackbone(make_ebc(), 1))
        grown = _schema()
        grown.fields[0] = FieldSpec("user_id", cardinality=30, description="user id")
        grown.fields.append(FieldSpec("city", cardinality=5, description="city"))
        # the field added is named; the grown table is not what the field vectors differ in
        with pytest.raises(VectorProvenanceError, match=r"\(field 'city' only in the current schema\)\. Re-encode"):
            build_llactr_terms(LLaCTRConfig(path), grown, LinearBackbone(make_ebc(), 1))

    @pytest.mark.parametrize("change, named", [
        (lambda fields: [dataclasses.replace(fields[0], name="customer_id"), *fields[1:]],
         r"field 'user_id' only in the recorded schema; field 'customer_id' only in the current schema"),
        (lambda fields: [*fields[:2], dataclasses.replace(fields[2], description="main genre"), fields[3]],
         r"genre: description 'genre of the item' -> 'main genre'"),
        (lambda fields: [fields[1], fields[0], *fields[2:]],
         r"field order \['user_id', 'item_id', 'genre', 'price'\] -> \['item_id', 'user_id', 'genre', 'price'\]"),
        (lambda fields: [*fields[:3], FieldSpec("price", "sparse", 50, description="price")],
         r"price: kind 'dense' -> 'sparse'"),  # its size follows from its kind
    ], ids=["renamed", "described_otherwise", "reordered", "other_kind"])
    def test_field_vectors_of_other_field_names_texts_order_or_kinds_are_refused(self, tmp_path, change,
                                                                                  named) -> None:
        """What a field vector means (its field's name, kind and description, the fields' order) still ties
        the file to the schema: each change is named."""
        path = _vectors(tmp_path, _schema())
        changed = _schema()
        changed.fields = change(changed.fields)
        with pytest.raises(VectorProvenanceError, match=rf"field-vector fingerprint .*\({named}\)\. Re-encode them"):
            build_llactr_terms(LLaCTRConfig(path, use_fie=False), changed, LinearBackbone(make_ebc(), 1))

    def test_field_vectors_train_under_a_schema_whose_tables_grew(self, tmp_path) -> None:
        """An item table that grows with each retrain (cardinality, or hashed into more buckets) changes nothing a
        field vector depends on: the file encoded for the old schema trains the model of the new one, whose table
        has the new size. They were refused ('user_id: cardinality 20 -> 30. Re-encode'), which with a 7B LLM
        meant SSFT and encode on a GPU for every retrain."""
        from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone

        schema = _schema()
        path = _vectors(tmp_path, schema)
        grown = _schema()
        grown.fields[0] = FieldSpec("user_id", cardinality=300, description="user id")
        grown.fields[1] = FieldSpec("item_id", cardinality=64, hashed=True, description="item id")
        assert grown.fingerprint() != schema.fingerprint()
        torch.manual_seed(0)
        backbone = build_backbone(SMOKE_CONFIGS["deepfm"], grown, device=torch.device("cpu"))
        rows = {c.name: c.num_embeddings for c in backbone.embedding_bag_collection.embedding_bag_configs()}
        assert rows["t_user_id"] == 300 and rows["t_item_id"] == 64
        logit_terms, loss_terms, provenance = build_llactr_terms(LLaCTRConfig(path), grown, backbone)
        assert provenance["schema_fingerprint"] == schema.fingerprint()  # the record of the file, as it was made
        assert provenance["schema_semantic_fingerprint"] == grown.semantic_fingerprint()
        task = CTRTask(backbone, logit_terms=logit_terms, loss_terms=loss_terms)
        optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
        kjt = make_kjt()
        ids = kjt.values().clone()
        ids[0] = 299  # a user of the grown table (the batch's first id is user_id's)
        kjt = type(kjt).from_lengths_sync(keys=kjt.keys(), values=ids, lengths=kjt.lengths())
        loss, _ = task(Batch(torch.randn(4, 1), kjt, torch.tensor([0.0, 1.0, 1.0, 0.0])))
        loss.backward()
        optimizer.step()
        assert backbone.embedding_bag_collection.embedding_bags["t_user_id"].weight.grad[299].abs().sum() > 0

    def test_vectors_of_an_older_version_say_what_may_differ(self, tmp_path) -> None:
        """A file written before provenance recorded the schema's contents: the fields are not named."""
        path = str(tmp_path / "fields.safetensors")
        provenance = VectorProvenance(model_id="tiny", model_hash="h", pooling="mean", template="{name}: {description}")
        provenance = dataclasses.replace(provenance.for_schema(_schema()), schema_contents={},
                                         schema_semantic_fingerprint="")
        save_vectors(path, torch.randn(4, 12), ["user_id", "genre", "item_id", "price"], provenance)
        with pytest.raises(VectorProvenanceError, match="the same field names: their kinds, sizes or descriptions"):
            build_llactr_terms(LLaCTRConfig(path), _schema(genre_text="main genre"), LinearBackbone(make_ebc(), 1))

    def test_vectors_of_an_older_version_keep_the_check_of_the_whole_schema(self, tmp_path) -> None:
        """A file written before field-vector files recorded the fingerprint of what they depend on has only the
        schema's fingerprint, which covers the tables' sizes: a grown table is refused as before, named."""
        path = str(tmp_path / "fields.safetensors")
        provenance = VectorProvenance(model_id="tiny", model_hash="h", pooling="mean", template="{name}: {description}")
        provenance = dataclasses.replace(provenance.for_schema(_schema()), schema_semantic_fingerprint="")
        save_vectors(path, torch.randn(4, 12), ["user_id", "genre", "item_id", "price"], provenance)
        build_llactr_terms(LLaCTRConfig(path), _schema(), LinearBackbone(make_ebc(), 1))  # its own schema
        grown = _schema()
        grown.fields[0] = FieldSpec("user_id", cardinality=30, description="user id")
        with pytest.raises(VectorProvenanceError, match=r"current schema 'toy' has fingerprint [0-9a-f]+ with fields "
                                                        r".*\(user_id: cardinality 20 -> 30\)\. Re-encode"):
            build_llactr_terms(LLaCTRConfig(path), grown, LinearBackbone(make_ebc(), 1))

    def test_config_errors(self) -> None:
        with pytest.raises(ValueError, match="unknown keys \\['lambda'\\]"):
            LLaCTRConfig.from_dict({"vectors_path": "x", "lambda": 0.1})
        with pytest.raises(ValueError, match="'vectors_path'"):
            LLaCTRConfig.from_dict({})
        for empty in ("", None):  # `llactr.vectors_path=` on the command line: not "': vector file not found"
            with pytest.raises(ValueError, match=r"llactr.vectors_path: empty; .*recsys-llm semantics encode"):
                LLaCTRConfig.from_dict({"vectors_path": empty})
        with pytest.raises(ValueError, match="llactr.fre_field_reduction: expected one of .*got 'avg'"):
            LLaCTRConfig.from_dict({"vectors_path": "x", "fre_field_reduction": "avg"})
        for key, bad in (("lambda_fre", float("nan")), ("lambda_fie", float("inf")), ("lambda_fie", -0.1)):
            with pytest.raises(ValueError, match=f"llactr.{key}: expected a finite number >= 0, got {bad!r}"):
                LLaCTRConfig.from_dict({"vectors_path": "x", key: bad})

    def test_a_config_built_in_python_is_checked_as_a_config_file_is(self) -> None:
        # the usage guide builds LLaCTRConfig(path, ...) directly: a negative lambda would maximise its term
        for key, bad in (("lambda_fre", -0.1), ("lambda_fie", float("nan")), ("lambda_fre", True)):
            with pytest.raises(ValueError, match=f"llactr.{key}: expected a finite number >= 0, got {bad!r}"):
                LLaCTRConfig("x", **{key: bad})
        with pytest.raises(ValueError, match="llactr.fre_field_reduction: expected one of .*got 'avg'"):
            LLaCTRConfig("x", fre_field_reduction="avg")
        with pytest.raises(ValueError, match="llactr.fields: expected a list of field names, got the string 'item_id'"):
            LLaCTRConfig("x", fields="item_id")


def _sharded_llactr(schema_path: str, vectors_path: str, steps: int):
    import logging

    from recsys_llm.data.parquet import ParquetBatchReader
    from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
    from recsys_llm.train.distributed import init_distributed
    from recsys_llm.train.pipeline import train_epoch
    from recsys_llm.train.sharding import build_optimizer, shard_model
    from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig

    messages = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logging.getLogger("torchrec").addHandler(Collect(logging.DEBUG))
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    schema = DatasetSchema.load(schema_path)
    backbone = build_backbone(SMOKE_CONFIGS["deepfm"], schema, device=torch.device("meta"))
    config = LLaCTRConfig(vectors_path, lambda_fre=0.5, lambda_fie=0.1)
    logit_terms, loss_terms, _ = build_llactr_terms(config, schema, backbone)
    fre_before = loss_terms["fre"].projection.weight.detach().clone()
    task = CTRTask(backbone, logit_terms=logit_terms, loss_terms=loss_terms)
    sharding = ShardingConfig(sharding_types=["table_wise", "row_wise"])
    optim = OptimizerConfig(sparse="row_wise_adagrad", sparse_lr=0.1, dense="adam", dense_lr=0.01)
    model, _ = shard_model(task, ctx.device, ctx.world_size, sharding, optim, batch_size=64)
    reader = ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size)
    stats = train_epoch(model, build_optimizer(model, optim), reader, ctx.device,
                        on_step=lambda step, loss: step >= steps, progress=False)
    params = {k: v.detach().tolist() for k, v in model.named_parameters() if "loss_terms." in k or "logit_terms." in k}
    return {
        "steps": stats.steps, "pipelined": stats.pipelined_modules, "sharded": stats.sharded_modules,
        "not_pipelined": [m for m in messages if "will NOT be pipelined" in m],
        "params": params, "fre_before": fre_before.tolist(),
    }


@pytest.mark.multiprocess
def test_fre_and_fie_train_on_two_ranks_with_sharded_tables(tmp_path) -> None:
    from recsys_llm.data.synthetic import generate_synthetic
    from tests.multiprocess import run_multiprocess

    data = str(tmp_path / "synthetic")
    generate_synthetic(data, 2_000, seed=0, rows_per_group=512)
    schema = DatasetSchema.load(data)
    names = [f.name for f in schema.categorical_fields]
    provenance = VectorProvenance(model_id="random", model_hash="r", pooling="mean", template="{name}")
    vectors_path = str(tmp_path / "fields.safetensors")
    save_vectors(vectors_path, torch.randn(len(names), 16, generator=torch.Generator().manual_seed(0)), names,
                 provenance.for_schema(schema))
    results = run_multiprocess(_sharded_llactr, world_size=2, schema_path=data, vectors_path=vectors_path, steps=3)
    for result in results:
        assert result["steps"] == 3 and result["not_pipelined"] == []
        assert result["pipelined"] == result["sharded"] and result["sharded"]
    fre_keys = [k for k in results[0]["params"] if k.endswith("fre.projection.weight")]
    fie_keys = [k for k in results[0]["params"] if k.endswith("fie.pair_weight.weight")]
    assert fre_keys and fie_keys
    for key in results[0]["params"]:  # dense plug-in weights are data-parallel: equal on both ranks
        torch.testing.assert_close(torch.tensor(results[0]["params"][key]), torch.tensor(results[1]["params"][key]))
    assert results[0]["params"][fre_keys[0]] != results[0]["fre_before"]


def test_a_feature_read_by_several_tables_of_a_dlrm_is_named(tmp_path) -> None:
    """torchrec keys its pooled embeddings 'genre@t_genre', ...: FRE / FIE would find no key 'genre' at the first step."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    schema = _schema()
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t_ids", embedding_dim=8, num_embeddings=20, feature_names=["user_id", "item_id"]),
        EmbeddingBagConfig(name="t_genre", embedding_dim=8, num_embeddings=20, feature_names=["genre"]),
        EmbeddingBagConfig(name="t_genre_hashed", embedding_dim=8, num_embeddings=20, feature_names=["genre"]),
    ])
    dlrm = DLRM(ebc, 1, [8, 8], [16, 1])
    with pytest.raises(ValueError, match=r"LLaCTR on DLRM: feature 'genre' is read by several tables .*"
                                         r"\['t_genre', 't_genre_hashed'\]\); torchrec then keys its pooled embeddings "
                                         r"'genre@t_genre', 'genre@t_genre_hashed'"):
        build_llactr_terms(LLaCTRConfig(_vectors(tmp_path, schema)), schema, dlrm)


class TestConfigSwitches:
    @pytest.mark.parametrize("second", [["item_id"], 0.05])
    def test_a_value_given_in_a_switchs_place_is_refused(self, second) -> None:
        """LLaCTRConfig(path, ["item_id"]) (meant for fields) or LLaCTRConfig(path, 0.05) (a lambda) set use_fre to a
        truthy value that was accepted: every field, or the default lambda, trained without a word."""
        with pytest.raises(TypeError, match="positional argument"):
            LLaCTRConfig("fields.safetensors", second)

    @pytest.mark.parametrize("name", ["use_fre", "use_fie", "normalize_vectors"])
    def test_a_switch_takes_booleans_only(self, name) -> None:
        with pytest.raises(ValueError, match=rf"llactr\.{name}: expected true or false, got 'false'"):
            LLaCTRConfig("fields.safetensors", **{name: "false"})
        config = LLaCTRConfig("fields.safetensors", **{name: False})
        assert getattr(config, name) is False


def test_the_device_may_be_named_as_a_string(tmp_path) -> None:
    """As torch's own calls take it: build_llactr_terms(..., "cpu") failed with
    "'str' object has no attribute 'type'"."""
    schema = _schema()
    logit_terms, loss_terms, _ = build_llactr_terms(LLaCTRConfig(_vectors(tmp_path, schema)), schema,
                                                    LinearBackbone(make_ebc(dim=8), 1), "cpu")
    assert logit_terms["fie"].pair_weight.weight.device.type == "cpu"
    assert loss_terms["fre"].projection.weight.device.type == "cpu"


def test_llactr_config_refuses_a_non_string_vectors_path_and_takes_a_path():
    import pathlib
    from recsys_llm.modules.llactr import LLaCTRConfig

    with pytest.raises(ValueError, match=r"llactr.vectors_path: expected a string, got True"):
        LLaCTRConfig(True)
    assert LLaCTRConfig(pathlib.Path("v/f.safetensors")).vectors_path == "v/f.safetensors"
