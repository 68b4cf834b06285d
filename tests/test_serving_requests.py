"""ServedModel refuses malformed requests and damaged artifacts with one clear ValueError, and
state files (a frozen teacher's) with NaN / inf tensors or pickled code, naming the file."""

import json
import os
import pickle
import re
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.data.tabular import prepare_tabular
from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.modules.elec import ELECConfig, build_elec_task, build_gain_network, load_elec_state
from recsys_llm.modules.teacher_student import TeacherStudentConfig
from recsys_llm.serving import ServedModel, export_task, load_state_file, open_state_file
from tests.data.test_tabular_like import NEW, SCHEMA as SHOP_SCHEMA, _csv, _old_rows
from tests.small_artifact import as_exported_before_config_digests, export_small_deepfm, write_config_as_exported

CPU = torch.device("cpu")
KEYS = ["user_id", "item_id", "genres"]
SCHEMA = DatasetSchema("t", [FieldSpec("user_id", "sparse", 10), FieldSpec("item_id", "sparse", 12),
                             FieldSpec("genres", "sequence", 5, max_length=3), FieldSpec("age", "dense"),
                             FieldSpec("price", "dense"), FieldSpec("hour", "dense")])


def kjt(users: List[int], items: List[int], genres: List[List[int]],
        keys: Tuple[str, ...] = tuple(KEYS)) -> KeyedJaggedTensor:
    """A request's KJT of ``len(users)`` rows, features in ``keys`` order (a subset drops features)."""
    columns = {"user_id": [[u] for u in users], "item_id": [[i] for i in items], "genres": genres}
    bags = [bag for key in keys for bag in columns[key]]
    values = torch.tensor([v for bag in bags for v in bag], dtype=torch.int64)
    lengths = torch.tensor([len(bag) for bag in bags], dtype=torch.int32)
    return KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=values, lengths=lengths)


def request(batch_size: int = 4, seed: int = 0) -> Tuple[torch.Tensor, KeyedJaggedTensor]:
    """A valid request: dense (B, 3) float32 and the KJT of B rows."""
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, 10, (batch_size,), generator=g).tolist()
    items = torch.randint(0, 12, (batch_size,), generator=g).tolist()
    genres = [torch.randint(0, 5, (row % 4,), generator=g).tolist() for row in range(batch_size)]
    return torch.randn(batch_size, 3, generator=g), kjt(users, items, genres)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Tuple[str, CTRTask]:
    """An exported DeepFM (3 dense features) and the task it was exported from."""
    torch.manual_seed(0)
    task = CTRTask(build_backbone(SMOKE_CONFIGS["deepfm"], SCHEMA, device=CPU)).eval()
    directory = str(tmp_path_factory.mktemp("served") / "export")
    dense, sparse = request(4, 100)
    config = export_task(task, directory, dense, sparse, schema=SCHEMA)
    assert config["dense_program"] == "dense_program.pt2", config["dense_program_error"]
    return directory, task


class _Counting(nn.Module):
    """Wraps a module and counts its calls (to show a refused request never reached the model)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args: object) -> torch.Tensor:
        self.calls += 1
        return self.module(*args)


def _with(dense: torch.Tensor, row: int, column: int, value: float) -> torch.Tensor:
    """``dense`` with one value changed."""
    changed = dense.clone()
    changed[row, column] = value
    return changed


DENSE, SPARSE = request(4, 1)
BAD_REQUESTS: Dict[str, Tuple[Callable[[], Tuple[object, object]], str]] = {
    "missing feature": (lambda: (DENSE, kjt([1, 2, 3, 4], [1, 2, 3, 4], [], keys=("user_id", "item_id"))),
                        r"sparse features: missing \['genres'\]; expected each of this model's features once, in any "
                        r"order: \['user_id', 'item_id', 'genres'\]"),
    "repeated feature": (lambda: (DENSE, KeyedJaggedTensor.from_lengths_sync(
                             KEYS + ["user_id"], torch.cat([SPARSE.values(), torch.tensor([1, 2, 3, 4])]),
                             torch.cat([SPARSE.lengths(), torch.ones(4, dtype=torch.int32)]))),
                         r"sparse features: repeated \['user_id'\]; expected"),
    "malformed spare feature": (lambda: (DENSE, KeyedJaggedTensor(
                                    KEYS + ["city"], torch.cat([SPARSE.values(), torch.tensor([1, 2, 3])]),
                                    lengths=torch.cat([SPARSE.lengths(), torch.ones(4, dtype=torch.int32)]))),
                                r"sparse features: lengths sum to .* but there are .* ids"),
    "float ids": (lambda: (DENSE, KeyedJaggedTensor.from_lengths_sync(KEYS, SPARSE.values().float(), SPARSE.lengths())),
                  r"sparse features: ids \(values\) are a torch\.float32 tensor .*; expected a 1-D integer tensor"),
    "2-D lengths": (lambda: (DENSE, KeyedJaggedTensor(KEYS, SPARSE.values(), lengths=SPARSE.lengths().view(-1, 1))),
                    r"sparse features: lengths are a torch\.int32 tensor of shape \(\d+, 1\); expected a 1-D"),
    "lengths not summing to the ids": (
        lambda: (DENSE, KeyedJaggedTensor(KEYS, SPARSE.values()[:-1], lengths=SPARSE.lengths())),
        rf"sparse features: lengths sum to {SPARSE.values().numel()} but there are {SPARSE.values().numel() - 1} ids"),
    "length_per_key disagreeing with the lengths": (  # the ids were sliced per feature by it: other ids, silently
        lambda: (DENSE, KeyedJaggedTensor(KEYS, SPARSE.values(), lengths=SPARSE.lengths(), length_per_key=[
            n + shift for n, shift in zip(SPARSE.length_per_key(), [1, -1, 0])])),
        r"sparse features: length_per_key is \[5, 3, \d+\] but the lengths count \[4, 4, \d+\] ids per feature"),
    "negative length": (lambda: (DENSE, KeyedJaggedTensor.from_lengths_sync(
                            KEYS, torch.tensor([1, 2, 3, 4, 1, 2, 3, 4, 0, 1]),
                            torch.tensor([1] * 8 + [3, -1, 0, 0], dtype=torch.int32))),
                        r"sparse features: feature 'genres', row 1: length -1; expected a count >= 0"),
    "lengths of another count": (lambda: (DENSE, KeyedJaggedTensor(KEYS, SPARSE.values(), lengths=torch.cat(
                                     [SPARSE.lengths(), torch.zeros(1, dtype=torch.int32)]))),
                                 r"sparse features: 13 lengths for 3 features; expected one length per \(feature, row\)"),
    "batch sizes per feature": (lambda: (DENSE, KeyedJaggedTensor(  # a variable-batch KJT: 3 rows of item_id
                                    KEYS, torch.tensor([1, 2, 3, 4, 5, 6, 7, 1, 2, 3]),
                                    lengths=torch.tensor([1] * 7 + [0, 1, 2, 0], dtype=torch.int32),
                                    stride_per_key_per_rank=[[4], [3], [4]])),
                                r"sparse features: batch sizes \[3, 4\] differ per feature; expected one B for all"),
    "dense width": (lambda: (DENSE[:, :2], SPARSE),
                    r"dense_features: expected \(B, 3\) with B = 4, the sparse features' batch size, got \(4, 2\)"),
    "dense wider than the model": (lambda: (torch.cat([DENSE, DENSE[:, :1]], dim=1), SPARSE),
                                   r"dense_features: expected \(B, 3\) with B = 4, the sparse features' batch size, "
                                   r"got \(4, 4\)"),
    "an id beyond what the lengths count": (  # the id past the last bag was dropped silently
        lambda: (DENSE, KeyedJaggedTensor(KEYS, torch.cat([SPARSE.values(), torch.tensor([1])]),
                                          lengths=SPARSE.lengths())),
        rf"sparse features: lengths sum to {SPARSE.values().numel()} but there are {SPARSE.values().numel() + 1} ids"),
    "dense batch size": (lambda: (torch.zeros(5, 3), SPARSE),
                         r"dense_features: expected \(B, 3\) with B = 4.*got \(5, 3\)"),
    "1-D dense": (lambda: (DENSE[:, 0], SPARSE), r"dense_features: expected \(B, 3\) with B = 4.*got \(4,\)"),
    "empty batch": (lambda: (torch.zeros(0, 3), kjt([], [], [])),
                    r"empty batch: dense_features and the sparse features have 0 rows; expected at least one"),
    "NaN dense": (lambda: (_with(DENSE, 2, 1, float("nan")), SPARSE),
                  r"dense_features row 2, column 1: value nan; expected finite values"),
    "inf dense": (lambda: (_with(DENSE, 3, 0, -float("inf")), SPARSE),
                  r"dense_features row 3, column 0: value -inf; expected finite values"),
    "float64 beyond float32": (lambda: (_with(DENSE.double(), 0, 2, 1e300), SPARSE),
                               r"dense_features row 0, column 2: value 1e\+300 \(as float32: inf\); expected finite"),
}

# inputs of another type than the (B, Dd) real tensor and the KJT: (make the request, error, message)
REQUESTS_OF_ANOTHER_TYPE: Dict[str, Tuple[Callable[[], Tuple[object, object]], type, str]] = {
    "numpy dense": (lambda: (DENSE.numpy(), SPARSE), TypeError,
                    r"^dense_features: expected a \(B, 3\) float32 torch\.Tensor, got ndarray$"),
    "complex dense": (lambda: (DENSE.to(torch.complex64), SPARSE), ValueError,
                      r"^dense_features: dtype torch\.complex64; expected real numbers \(float32\)$"),
    "dict sparse": (lambda: (DENSE, SPARSE.to_dict()), TypeError,
                    r"^sparse_features: expected a KeyedJaggedTensor of the features \['user_id', 'item_id', "
                    r"'genres'\], got dict$"),
}


class TestServedModelRequests:
    @pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
    def test_a_malformed_request_is_a_value_error_before_the_model_runs(self, artifact, case):
        served = ServedModel.load(artifact[0], trust_program=True)
        served.embedding_bag_collection = _Counting(served.embedding_bag_collection)
        served.dense_program = _Counting(served.dense_program)
        make, message = BAD_REQUESTS[case]
        dense, sparse = make()
        with pytest.raises(ValueError, match=message):
            served.predict(dense, sparse)
        assert served.embedding_bag_collection.calls == served.dense_program.calls == 0
        served.predict(DENSE, SPARSE)  # the wrappers pass a valid request on
        assert served.embedding_bag_collection.calls == served.dense_program.calls == 1

    @pytest.mark.parametrize("case", sorted(REQUESTS_OF_ANOTHER_TYPE))
    def test_a_request_of_another_type_is_refused_before_the_model_runs(self, artifact, case):
        """A numpy array, complex numbers or a dict of ids (what a JSON request decodes to) would fail deep in
        torchrec or the program, or serve the real part of complex values silently."""
        served = ServedModel.load(artifact[0], trust_program=True)
        served.embedding_bag_collection = _Counting(served.embedding_bag_collection)
        served.dense_program = _Counting(served.dense_program)
        make, error, message = REQUESTS_OF_ANOTHER_TYPE[case]
        dense, sparse = make()
        with pytest.raises(error, match=message):
            served.predict(dense, sparse)
        assert served.embedding_bag_collection.calls == served.dense_program.calls == 0

    def test_spare_features_of_a_request_are_dropped(self, artifact):
        """A feature store often sends every feature it has: the model's own are served, as an EBC serves them."""
        served = ServedModel.load(artifact[0], trust_program=True)
        with_spare = KeyedJaggedTensor.from_lengths_sync(
            ["city"] + KEYS, torch.cat([torch.tensor([7, 8, 9, 10, 11]), SPARSE.values()]),
            torch.cat([torch.tensor([2, 1, 1, 1], dtype=torch.int32), SPARSE.lengths()]))
        assert torch.equal(served.logits(DENSE, with_spare), served.logits(DENSE, SPARSE))

    def test_float64_and_integer_dense_features_are_served_as_float32(self, artifact):
        directory, task = artifact
        served = ServedModel.load(directory, trust_program=True)
        dense, sparse = request(6, 3)
        with torch.no_grad():
            expected = task.model(dense, sparse).logits
        assert torch.equal(served.logits(dense.double(), sparse), expected)  # float32 values: exact in float64
        whole = dense.round()
        with torch.no_grad():
            expected = task.model(whole, sparse).logits
        assert torch.equal(served.logits(whole.to(torch.int64), sparse), expected)

    def test_features_in_another_order_and_finite_values_whose_sum_overflows_serve(self, artifact):
        directory, task = artifact
        served = ServedModel.load(directory, trust_program=True)
        dense, sparse = request(4, 5)
        dense[0] = torch.tensor([3e38, 3e38, 3e38])  # finite, though their float32 sum is inf
        genres = torch.split(sparse["genres"].values(), sparse["genres"].lengths().tolist())
        reordered = kjt(sparse["user_id"].values().tolist(), sparse["item_id"].values().tolist(),
                        [bag.tolist() for bag in genres], keys=("genres", "item_id", "user_id"))
        with torch.no_grad():
            expected = task.model(dense, sparse).logits
        if torch.isfinite(expected).all():
            torch.testing.assert_close(served.logits(dense, reordered), expected)
        else:  # the model overflows on them: named, not served as NaN probabilities
            row = int((~torch.isfinite(expected)).nonzero()[0, 0])
            with pytest.raises(ValueError, match=f"^row {row}: the model's logit is .* for finite inputs"):
                served.logits(dense, reordered)
        dense[0] = torch.tensor([3.0, -2.0, 1.0])
        with torch.no_grad():
            expected = task.model(dense, sparse).logits
        torch.testing.assert_close(served.logits(dense, reordered), expected)

    def test_finite_inputs_the_model_overflows_on_are_named_not_served_as_nan(self, artifact):
        """A dense value of 1e20 (finite, far beyond training) gave a NaN probability without a word."""
        directory, _ = artifact
        served = ServedModel.load(directory, trust_program=True)
        dense, sparse = request(4, 5)
        dense[2, 1] = 1e20
        with torch.no_grad():
            raw = served.dense_program(dense, served.embedding_bag_collection(sparse).values())
        assert not torch.isfinite(raw[2])  # what the program alone gives
        with pytest.raises(ValueError, match=r"^row 2: the model's logit is nan for finite inputs \(its largest dense "
                                             r"value is 1e\+20 in absolute value\)"):
            served.predict(dense, sparse)


def _truncate(name: str) -> Callable[[str], None]:
    def damage(directory: str) -> None:
        path = os.path.join(directory, name)
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
    return damage


def _changed_weight(name: str) -> Callable[[str], None]:
    """Changes the low byte of a float32 weight in ``name`` (the value stays finite, the file readable)."""
    def damage(directory: str) -> None:
        path = os.path.join(directory, name)
        with open(path, "rb") as handle:
            data = bytearray(handle.read())
        if name.endswith(".pt2"):  # inside the largest stored weight of the zip archive
            import zipfile
            with zipfile.ZipFile(path) as archive:
                entry = max((i for i in archive.infolist() if "/weights/weight_" in i.filename), key=lambda i: i.file_size)
            assert entry.compress_type == zipfile.ZIP_STORED
            start = entry.header_offset + 30 + int.from_bytes(data[entry.header_offset + 26 : entry.header_offset + 28],
                                                              "little") + int.from_bytes(
                data[entry.header_offset + 28 : entry.header_offset + 30], "little")
            position = start + (entry.file_size // 8) * 4
        else:
            position = len(data) - 4  # the last float's lowest mantissa byte
        data[position] ^= 1
        with open(path, "wb") as handle:
            handle.write(bytes(data))
    return damage


def _weight_made_nan(name: str) -> Callable[[str], None]:
    """Sets every exponent bit of the last float32 in ``name`` (a damaged disk or copy): that weight is NaN."""
    def damage(directory: str) -> None:
        path = os.path.join(directory, name)
        with open(path, "r+b") as handle:
            handle.seek(-2, os.SEEK_END)
            high = bytearray(handle.read(2))  # little-endian: exponent in bits 7-14 of the last two bytes
            high[0] |= 0x80
            high[1] |= 0x7F
            handle.seek(-2, os.SEEK_END)
            handle.write(bytes(high))
    return damage


def _edited_program(old: bytes, new: bytes) -> Callable[[str], None]:
    """Replaces ``old`` by ``new`` (same length) in ``dense_program.pt2``'s stored graph: the zip stays readable
    (torch's reader checks no CRC) and the graph names another parameter or holds guard code Python cannot
    parse."""
    def damage(directory: str) -> None:
        path = os.path.join(directory, "dense_program.pt2")
        with open(path, "rb") as handle:
            data = handle.read()
        assert len(old) == len(new) and data.count(old) >= 1
        with open(path, "wb") as handle:
            handle.write(data.replace(old, new, 1))
    return damage


def _edited(name: str, old: bytes, new: bytes) -> Callable[[str], None]:
    """Replaces ``old`` by ``new`` in the artifact's file ``name`` (an edit that leaves it readable)."""
    def damage(directory: str) -> None:
        path = os.path.join(directory, name)
        with open(path, "rb") as handle:
            data = handle.read()
        assert data.count(old) >= 1
        with open(path, "wb") as handle:
            handle.write(data.replace(old, new))
    return damage


def _without_state_key(directory: str) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    del config["state"]
    write_config_as_exported(path, config)


def _config_naming(key: str, name: Optional[str]) -> Callable[[str], None]:
    """Points ``config.json``'s ``key`` at ``name`` relative to the artifact (a copy of the real file put
    there, so only the name is wrong), or at the real file's absolute path when ``name`` is None."""
    def damage(directory: str) -> None:
        path = os.path.join(directory, "config.json")
        with open(path) as handle:
            config = json.load(handle)
        real = os.path.join(directory, config[key])
        if name is None:
            config[key] = os.path.abspath(real)
        else:
            shutil.copy(real, os.path.normpath(os.path.join(directory, name)))
            config[key] = name
        write_config_as_exported(path, config)
    return damage


def _without(key: str) -> Callable[[str], None]:
    """Removes ``config.json``'s ``key``."""
    return _config_with(key, _REMOVED)


_REMOVED = object()


def _config_with(key: str, value: object) -> Callable[[str], None]:
    """Sets ``config.json``'s ``key`` to ``value`` (removes it for ``_REMOVED``)."""
    def damage(directory: str) -> None:
        path = os.path.join(directory, "config.json")
        with open(path) as handle:
            config = json.load(handle)
        if value is _REMOVED:
            del config[key]
        else:
            config[key] = value
        write_config_as_exported(path, config)
    return damage


def _edited_by_hand(change: Callable[[Dict[str, Any]], None]) -> Callable[[str], None]:
    """Applies ``change`` to ``config.json``'s dict and writes it back as an editor would, its digest left as it was."""
    def damage(directory: str) -> None:
        path = os.path.join(directory, "config.json")
        with open(path) as handle:
            config = json.load(handle)
        change(config)
        with open(path, "w") as handle:
            json.dump(config, handle, indent=2)
    return damage


def _not_json(directory: str) -> None:
    with open(os.path.join(directory, "config.json"), "w") as handle:
        handle.write('{"format_version": 1, "feature_names": [')


DAMAGES: Dict[str, Tuple[Callable[[str], None], str, str]] = {
    # keys of valid types and values, edited after the export: the scores (or what is checked) changed silently
    "an id rule edited by hand": (_edited_by_hand(lambda c: c["id_rules"]["user_id"].update(hashed=True)),
                                  "config.json", r"its keys changed after the export \(config_sha256 does not match"),
    "a feature added by hand": (_edited_by_hand(lambda c: c["feature_names"].append("zzz")), "config.json",
                                r"its keys changed after the export"),
    "its digest removed by hand": (_edited_by_hand(lambda c: c.pop("config_sha256")), "config.json",
                                   r"has no config_sha256, which its export wrote \(model\.safetensors records it\): "
                                   r"config\.json was edited after the export"),
    "truncated model.safetensors": (_truncate("model.safetensors"), "model.safetensors", r"SafetensorError"),
    "config.json not JSON": (_not_json, "config.json", r"not valid JSON \(JSONDecodeError"),
    "config.json without its state key": (_without_state_key, "config.json", r"lacks the keys \['state'\]"),
    "truncated dense_program.pt2": (_truncate("dense_program.pt2"), "dense_program.pt2",
                                    r"bytes changed after the export \(sha256"),
    "a weight changed in model.safetensors": (_changed_weight("model.safetensors"), "model.safetensors",
                                              r"bytes changed after the export \(sha256"),
    "a weight of model.safetensors made NaN": (_weight_made_nan("model.safetensors"), "model.safetensors",
                                                r"bytes changed after the export \(sha256"),
    "a weight changed in dense_program.pt2": (_changed_weight("dense_program.pt2"), "dense_program.pt2",
                                              r"bytes changed after the export \(sha256"),
    "a parameter name changed in dense_program.pt2": (  # torch.export.load raised SpecViolationError
        _edited_program(b'"parameter_name": "task.model.head.weight"', b'"parameter_name": "task.model.head.weighT"'),
        "dense_program.pt2", r"bytes changed after the export \(sha256"),
    "a guard changed in dense_program.pt2": (  # torch.export.load raised SyntaxError
        _edited_program(b"size()[0] == L['dense", b"size()[0c == L['dense"), "dense_program.pt2",
        r"bytes changed after the export \(sha256"),
    # SUM -> MEAN loads (same shapes) and serves other predictions: only the digest tells
    "a table's pooling changed in tables.json": (_edited("tables.json", b'"pooling": "SUM"', b'"pooling": "MEAN"'),
                                                 "tables.json", r"bytes changed after the export \(sha256"),
    "weighted a string": (_config_with("weighted", "false"), "config.json",  # a truthy string: weighted tables
                          r"'weighted' is 'false', expected true or false"),
    "tables.json missing": (lambda d: os.remove(os.path.join(d, "tables.json")), "tables.json", r"file missing"),
    "state named outside the artifact": (_config_naming("state", "../outside.safetensors"), "config.json",
                                         r"'state' is '\.\./outside\.safetensors'; expected a file name inside"),
    "tables named by an absolute path": (_config_naming("tables", None), "config.json",
                                         r"'tables' is '/.*/tables\.json'; expected a file name inside"),
    "state null in config.json": (_config_with("state", None), "config.json",  # was a TypeError from os.path.join
                                  r"'state' is None; expected a file name inside"),
    "tables null in config.json": (_config_with("tables", None), "config.json",
                                   r"'tables' is None; expected a file name inside"),
    # the digests were skipped, and a width failed only at the first request
    "digests not an object": (_config_with("sha256", ["1", "2"]), "config.json",
                              r"'sha256' is \['1', '2'\], expected an object of file name -> sha256"),
    "dense width a string": (_config_with("num_dense_features", "3"), "config.json",
                             r"'num_dense_features' is '3', expected an integer >= 0"),
    "feature names not a list": (_config_with("feature_names", "user_id"), "config.json",
                                 r"'feature_names' is 'user_id', expected a list of feature names"),
    "an id rule not an object": (_config_with("id_rules", {"user_id": [1]}), "config.json",
                                 r"'id_rules'\['user_id'\] is \[1\], expected an object of hashed"),
    "an id rule's max length a string": (_config_with("id_rules", {"user_id": {"max_length": "3"}}), "config.json",
                                         r"'id_rules'\['user_id'\] is \{'max_length': '3'\}, expected"),
    "id rules a list": (_config_with("id_rules", []), "config.json", r"'id_rules' is \[\], expected an object"),
    "no format_version": (_without("format_version"), "config.json",  # said "export format None, this code reads 1"
                          r"no format_version: not an export's config\.json, or a damaged one"),
    "an id rule's max length negative": (_config_with("id_rules", {"user_id": {"max_length": -1}}), "config.json",
                                         r"'id_rules'\['user_id'\] is \{'max_length': -1\}, expected"),
    "dense width a bool": (_config_with("num_dense_features", True), "config.json",
                           r"'num_dense_features' is True, expected an integer >= 0"),
    "dense width negative": (_config_with("num_dense_features", -1), "config.json",
                             r"'num_dense_features' is -1, expected an integer >= 0"),
    "a digest not a string": (_config_with("sha256", {"model.safetensors": 1}), "config.json",
                              r"'sha256' is \{'model.safetensors': 1\}, expected an object of file name"),
    "an id rule's max length a bool": (_config_with("id_rules", {"user_id": {"max_length": True}}), "config.json",
                                       r"'id_rules'\['user_id'\] is \{'max_length': True\}, expected"),
    "an id rule's hashed flag a string": (_config_with("id_rules", {"user_id": {"hashed": "yes"}}), "config.json",
                                          r"'id_rules'\['user_id'\] is \{'hashed': 'yes'\}, expected"),
    "config.json a list": (lambda d: open(os.path.join(d, "config.json"), "w").write('["user_id", "item_id"]'),
                           "config.json", r"holds a JSON list, expected an object"),
    "model.safetensors missing": (lambda d: os.remove(os.path.join(d, "model.safetensors")), "model.safetensors",
                                  r"file missing"),
    "dense_program.pt2 missing": (lambda d: os.remove(os.path.join(d, "dense_program.pt2")), "dense_program.pt2",
                                  r"file missing"),
    # a FIFO's read would wait for good; a directory or a dangling link was "file missing"
    "model.safetensors a FIFO": (lambda d: (os.remove(os.path.join(d, "model.safetensors")),
                                            os.mkfifo(os.path.join(d, "model.safetensors"))), "model.safetensors",
                                 r"is a named pipe \(FIFO\), not a file"),
    "tables.json a directory": (lambda d: (os.remove(os.path.join(d, "tables.json")),
                                           os.mkdir(os.path.join(d, "tables.json"))), "tables.json",
                                r"is a directory, not a file"),
    "dense_program.pt2 a dangling link": (lambda d: (os.remove(os.path.join(d, "dense_program.pt2")),
                                                     os.symlink("/nonexistent/p.pt2", os.path.join(d, "dense_program.pt2"))),
                                          "dense_program.pt2", r"is a dangling symbolic link \(to /nonexistent/p\.pt2\), "
                                                               r"not a file"),
    "config.json nested past the recursion limit": (
        lambda d: open(os.path.join(d, "config.json"), "w").write("[" * 100_000 + "]" * 100_000), "config.json",
        r"not valid JSON \(RecursionError"),
}


def _without_digests_and_export_ids(directory: str) -> None:
    """Makes ``directory``'s config.json look written before digests and export ids were recorded."""
    from recsys_llm.serving.artifact import DIGESTS_KEY, EXPORT_ID_KEY

    config = as_exported_before_config_digests(directory)
    del config[DIGESTS_KEY], config[EXPORT_ID_KEY]
    write_config_as_exported(os.path.join(directory, "config.json"), config)


def _copy_of_format(version: int) -> Callable[[str, str], None]:
    """Copies the artifact, its config.json recording another ``format_version``."""
    def prepare(source: str, directory: str) -> None:
        shutil.copytree(source, directory)
        _config_with("format_version", version)(directory)
    return prepare


# (make the directory from the real artifact, error, message after "<directory>: ")
NOT_AN_ARTIFACT_OF_THIS_FORMAT: Dict[str, Tuple[Callable[[str, str], None], type, str]] = {
    "no directory": (lambda source, directory: None, FileNotFoundError,
                     r"no such directory; expected an export artifact \(`recsys-llm export`\)"),
    "another format version": (_copy_of_format(2), ValueError,
                               r"export format 2, this code reads 1; export the run again with this version"),
    "its config.json named": (lambda source, directory: shutil.copytree(source, os.path.dirname(directory)),
                              NotADirectoryError, r"a file; expected an export artifact's directory \(`recsys-llm "
                                                  r"export --output`\), e\.g\. \S+"),
}


class TestDamagedArtifacts:
    @pytest.mark.parametrize("case", sorted(DAMAGES))
    @pytest.mark.usefixtures("ends_the_run_if_it_waits")  # a FIFO read would wait for good
    def test_a_damaged_artifact_is_one_value_error_naming_its_file(self, artifact, tmp_path, case):
        directory = str(tmp_path / "copy")
        shutil.copytree(artifact[0], directory)
        damage, name, cause = DAMAGES[case]
        damage(directory)
        path = re.escape(os.path.join(directory, name))
        with pytest.raises(ValueError, match=rf"^{path}: .*{cause}.*the export artifact is damaged or incomplete: "
                                             r"export the model again \(`recsys-llm export"):
            ServedModel.load(directory, trust_program=True)

    @pytest.mark.parametrize("case", sorted(NOT_AN_ARTIFACT_OF_THIS_FORMAT))
    def test_a_path_that_is_no_artifact_of_this_format_is_refused_naming_it(self, artifact, tmp_path, case):
        """Not damage (no "export again" advice): a path that names no directory (a typo) is a FileNotFoundError,
        and an artifact of another format_version (a newer or older recsys_llm) names both versions."""
        directory = str(tmp_path / "copy" / ("config.json" if case == "its config.json named" else ""))
        prepare, error, message = NOT_AN_ARTIFACT_OF_THIS_FORMAT[case]
        prepare(artifact[0], directory)
        with pytest.raises(error, match=rf"^{re.escape(directory)}: {message}$"):
            ServedModel.load(directory, trust_program=True)

    def test_an_artifacts_file_named_instead_of_it_names_the_directory_to_load(self, artifact, tmp_path):
        """`ServedModel.load(export/config.json)`: the example to pass instead is the artifact's directory."""
        directory = str(tmp_path / "copy")
        shutil.copytree(artifact[0], directory)
        with pytest.raises(NotADirectoryError,
                           match=rf"\(`recsys-llm export --output`\), e\.g\. {re.escape(directory)}$"):
            ServedModel.load(os.path.join(directory, "config.json"), trust_program=True)

    def test_the_program_is_still_not_read_untrusted(self, artifact, tmp_path):
        directory = str(tmp_path / "copy")
        shutil.copytree(artifact[0], directory)
        _truncate("dense_program.pt2")(directory)
        with pytest.raises(PermissionError, match="trust_program=True"):
            ServedModel.load(directory)

    def test_weights_with_nan_are_refused(self, artifact, tmp_path):
        """In an artifact written before digests were recorded (with one, changed bytes are named first)."""
        directory = str(tmp_path / "copy")
        shutil.copytree(artifact[0], directory)
        path = os.path.join(directory, "model.safetensors")
        state = load_state_file(path)
        key = next(k for k in state if k.endswith("item_id.weight"))
        state[key][3, 1] = float("nan")
        save_file(state, path)
        _without_digests_and_export_ids(directory)
        with pytest.raises(ValueError, match=rf"{re.escape(path)}: tensor '{re.escape(key)}' holds 1 non-finite"):
            ServedModel.load(directory, trust_program=True)

    def test_a_changed_program_is_refused_before_torch_export_load_runs_it(self, artifact, tmp_path, monkeypatch):
        """torch.export.load evaluates code stored in the file: the digest and the export id were checked after it."""
        loads = []
        real_load = torch.export.load
        monkeypatch.setattr(torch.export, "load", lambda *args, **kwargs: loads.append(args) or real_load(*args, **kwargs))
        for damage, cause in [(_edited_program(b"size()[0] == L['dense", b"size()[0c == L['dense"),
                               r"bytes changed after the export \(sha256"),
                              (_truncate("dense_program.pt2"), r"bytes changed after the export \(sha256")]:
            directory = str(tmp_path / f"copy{len(loads)}")
            shutil.rmtree(directory, ignore_errors=True)
            shutil.copytree(artifact[0], directory)
            damage(directory)
            with pytest.raises(ValueError, match=cause):
                ServedModel.load(directory, trust_program=True)
        other, mixed = str(tmp_path / "other"), str(tmp_path / "mixed")  # the program of another export, copied in
        export_task(artifact[1], other, *request(4, 100), schema=SCHEMA)
        shutil.copytree(artifact[0], mixed)
        shutil.copy(os.path.join(other, "dense_program.pt2"), mixed)
        with pytest.raises(ValueError, match=r"dense_program.pt2: written by another export .* the artifact mixes"):
            ServedModel.load(mixed, trust_program=True)
        assert loads == []
        ServedModel.load(artifact[0], trust_program=True)
        assert len(loads) == 1

    def test_a_cut_program_of_an_artifact_without_digests_is_named(self, artifact, tmp_path):
        directory = str(tmp_path / "copy")
        shutil.copytree(artifact[0], directory)
        _truncate("dense_program.pt2")(directory)
        _without_digests_and_export_ids(directory)
        path = re.escape(os.path.join(directory, "dense_program.pt2"))
        with pytest.raises(ValueError, match=rf"^{path}: cannot be read as a torch.export program \(RuntimeError: "
                                             r"PytorchStreamReader failed reading zip archive"):
            ServedModel.load(directory, trust_program=True)

    def test_tables_of_another_dtype_are_refused_not_served_as_they_are(self, artifact, tmp_path):
        """An artifact written before digests and export ids were recorded (so nothing else notices): the tables
        are taken as stored, so a float16 table would reach the float32 dense program."""
        directory = str(tmp_path / "copy")
        shutil.copytree(artifact[0], directory)
        path = os.path.join(directory, "model.safetensors")
        state = load_state_file(path)
        key = next(k for k in state if k.endswith("item_id.weight"))
        state[key] = state[key].half()
        save_file(state, path)
        _without_digests_and_export_ids(directory)
        with pytest.raises(ValueError, match=rf"^{re.escape(path)}: table weights \['.*item_id\.weight "
                                             r"\(torch\.float16\)'\] are not float32, as export writes them"):
            ServedModel.load(directory, trust_program=True)


def test_an_artifact_of_other_library_versions_loads_with_a_warning(artifact, tmp_path, recwarn):
    """config.json records the versions that exported; another torch / torchrec / fbgemm_gpu warns, naming both."""
    from recsys_llm.serving.export import library_versions

    directory = str(tmp_path / "copy")
    shutil.copytree(artifact[0], directory)
    path = os.path.join(directory, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    assert {k: config["versions"][k] for k in library_versions()} == library_versions()
    ServedModel.load(directory, trust_program=True)
    assert not [w for w in recwarn if "exported with" in str(w.message)]
    config["versions"].update(torch="1.0.0+cu999", torchrec="0.1.0")
    write_config_as_exported(path, config)
    torch_version = re.escape(torch.__version__)
    with pytest.warns(UserWarning, match=rf"{re.escape(directory)}: exported with torch 1\.0\.0\+cu999, torchrec 0\.1\.0; "
                                         rf"this process has torch {torch_version}, torchrec .* export again"):
        served = ServedModel.load(directory, trust_program=True)
    dense, sparse = request(3, 5)
    assert served.logits(dense, sparse).shape == (3,)  # a warning, not a refusal


def test_versions_differing_only_in_a_local_build_tag_load_without_a_warning(artifact, tmp_path, recwarn):
    """An artifact exported on a GPU host (torch 2.x+cu126) and served on a CPU one (2.x+cpu) has the same
    releases: no warning, which would otherwise fire on every such host and hide a real difference."""
    directory = str(tmp_path / "copy")
    shutil.copytree(artifact[0], directory)
    with open(os.path.join(directory, "config.json")) as handle:
        versions = json.load(handle)["versions"]
    _config_with("versions", {**versions, "torch": versions["torch"].split("+")[0] + "+cu126"})(directory)
    ServedModel.load(directory, trust_program=True)
    assert not [w for w in recwarn if "exported with" in str(w.message)]


def _gain_state(bad_key_suffix: str, value: float) -> Tuple[Dict[str, torch.Tensor], str]:
    torch.manual_seed(0)
    gain = build_gain_network(ELECConfig(task="gain", vector_dim=8), SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU)
    state = {k: v.detach().clone().contiguous() for k, v in gain.state_dict().items()}
    key = next(k for k in state if k.endswith(bad_key_suffix) and state[k].is_floating_point())
    state[key].view(-1)[min(5, state[key].numel() - 1)] = value  # a table's row 0
    return state, key


def _load_frozen_teacher(path: str) -> None:
    config = ELECConfig(task="distill", vector_dim=8, teacher_checkpoint=path,
                        distill=TeacherStudentConfig(mode="frozen", beta=0.5))
    task = build_elec_task(config, SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU)
    load_elec_state(task, config)


class _RunsCode:
    """What a crafted ``.pt`` holds: unpickling it would create ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Tuple[Callable[..., object], Tuple[str, str]]:
        return (open, (self.marker, "w"))


class _RunsBlocked:
    """A crafted ``.pt`` naming a module torch.load blocks outright (``os``)."""

    def __reduce__(self) -> Tuple[Callable[..., object], Tuple[str]]:
        return (os.system, ("true",))


class TestStateFiles:
    @pytest.mark.parametrize("file_name, suffix, value", [
        ("gain.safetensors", "item_id.weight", float("nan")),  # a table: read slice by slice
        ("gain.pt", "item_id.weight", float("inf")),  # memory-mapped torch.save
        ("gain.safetensors", "bias", -float("inf")),
    ])
    def test_a_frozen_teacher_with_non_finite_tensors_is_refused(self, tmp_path, file_name, suffix, value):
        state, key = _gain_state(suffix, value)
        path = str(tmp_path / file_name)
        save_file(state, path) if file_name.endswith(".safetensors") else torch.save(state, path)
        with pytest.raises(ValueError, match=rf"^{re.escape(path)}: tensor '{re.escape(key)}' holds 1 non-finite "
                                             rf"value\(s\) \(first: {value}.*expected finite weights"):
            _load_frozen_teacher(path)
        with pytest.raises(ValueError, match=rf"{re.escape(path)}: tensor '{re.escape(key)}'"):
            load_state_file(path)

    @pytest.mark.parametrize("file_name", ["gain.pt", "gain.bin", "gain"])
    def test_a_safetensors_file_of_another_name_is_read_as_one(self, tmp_path, file_name):
        """Not refused as a torch.save file "holding objects other than tensors"."""
        state, key = _gain_state("item_id.weight", 0.5)
        path = str(tmp_path / file_name)
        save_file(state, path)
        assert torch.equal(load_state_file(path)[key], state[key])
        with open_state_file(path) as lazy:
            assert torch.equal(lazy[key][1:3], state[key][1:3])
        torch.save(state, path)  # and a torch.save file of that name stays one
        assert torch.equal(load_state_file(path)[key], state[key])

    def test_a_lazy_read_checks_only_the_part_it_reads(self, tmp_path):
        state, key = _gain_state("item_id.weight", float("nan"))  # in row 0
        path = str(tmp_path / "gain.safetensors")
        save_file(state, path)
        with open_state_file(path) as lazy:
            assert torch.equal(lazy[key][2:5], state[key][2:5])  # rows without the NaN
            with pytest.raises(ValueError, match="non-finite"):
                lazy[key][0:2]

    def test_a_crafted_pt_teacher_is_refused_with_its_path_and_runs_nothing(self, tmp_path):
        marker = tmp_path / "code_ran"
        path = str(tmp_path / "teacher.pt")
        with open(path, "wb") as handle:
            torch.save({"weight": torch.zeros(2), "payload": _RunsCode(str(marker))}, handle)
        for load in (_load_frozen_teacher, load_state_file):
            with pytest.raises(pickle.UnpicklingError, match=rf"^{re.escape(path)}: refused: the file holds objects "
                                                             r"other than tensors \(UnpicklingError: .*open"):
                load(path)
        assert not marker.exists()

    def test_a_pt_calling_a_blocked_module_is_refused_without_advice_to_load_it(self, tmp_path):
        # torch's refusal of a blocked module (os, subprocess) opens with 'Re-running torch.load with weights_only
        # set to False will likely succeed': the line shown must be the reason
        path = str(tmp_path / "teacher.pt")
        torch.save({"weight": torch.zeros(2), "payload": _RunsBlocked()}, path)
        with pytest.raises(pickle.UnpicklingError) as refused:
            load_state_file(path)
        assert re.match(rf"^{re.escape(path)}: refused: the file holds objects other than tensors \(UnpicklingError: "
                        r"Trying to load unsupported GLOBAL posix\.system whose module posix is blocked\.\)",
                        str(refused.value)), str(refused.value)
        assert "weights_only set to" not in str(refused.value)

    def test_a_truncated_teacher_file_is_named(self, tmp_path):
        state, _ = _gain_state("bias", 0.0)
        path = str(tmp_path / "gain.safetensors")
        save_file(state, path)
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
        with pytest.raises(ValueError, match=rf"^{re.escape(path)}: damaged or incomplete state file \(SafetensorError"):
            _load_frozen_teacher(path)

    @pytest.mark.parametrize("content", [b"hello world\n", b"user_id,item_id\n1,2\n", b"X\x01\x00\x00\x00\xb8",
                                         b"garbage" * 3])  # the last: torch's weights-only 'Unsupported operand
    def test_a_teacher_file_that_is_no_torch_save_file_is_named(self, tmp_path, content):  # text, CSV, bad UTF-8
        """A text file named as the teacher (a CSV, a note) raised a bare KeyError: 101, IndexError or
        UnicodeDecodeError from the unpickler, naming no file."""
        path = str(tmp_path / "teacher.pt")
        with open(path, "wb") as handle:
            handle.write(content)
        for load in (_load_frozen_teacher, load_state_file):
            with pytest.raises(ValueError, match=rf"^{re.escape(path)}: damaged or incomplete state file[ ,(]"):
                load(path)

    def test_a_text_file_with_a_brace_where_a_safetensors_header_opens_is_not_read_as_one(self, tmp_path):
        """A file is told to be safetensors by its bytes only with a ``{`` at byte 8 after a header length that
        fits in the file: a CSV with a brace there is named as the torch.save file it was given as."""
        path = str(tmp_path / "teacher.pt")
        with open(path, "wb") as handle:
            handle.write(b"user_id,{item_id}\n1,2\n")
        with pytest.raises(ValueError, match=rf"^{re.escape(path)}: damaged or incomplete state file.*; expected a "
                                             r"complete torch\.save"):
            load_state_file(path)

    def test_a_torch_save_of_an_old_pickle_protocol_is_named_as_such(self, tmp_path):
        """torch's weights-only unpickler reads no protocol 0 or 1: 'write it again' alone would not help."""
        path = str(tmp_path / "teacher.pt")
        torch.save({"w": torch.ones(2)}, path, pickle_protocol=0)
        with pytest.raises(ValueError, match=rf"^{re.escape(path)}: damaged or incomplete state file, or a torch.save "
                                             r"of pickle protocol 0 or 1 \(UnpicklingError: Unsupported operand"):
            load_state_file(path)

    @pytest.mark.parametrize("content, message", [
        (torch.ones(3), "holds an object of type Tensor, expected a state dict {name: tensor}"),
        ({"model": {"w": torch.ones(2)}, "epoch": 3},
         "entry 'model' is of type dict, expected a state dict {name: tensor} only (a checkpoint that keeps the state "
         "dict under a key"),
        ({"w": torch.ones(2), "step": 3}, "entry 'step' is of type int"),
        ({0: torch.ones(2)}, "entry 0 is of type Tensor"),
    ])
    def test_a_torch_save_file_of_other_contents_than_a_state_dict_is_named(self, tmp_path, content, message):
        """torch.load(weights_only=True) reads plain Python values and containers: they came back as the state."""
        path = str(tmp_path / "teacher.pt")
        torch.save(content, path)
        with pytest.raises(ValueError, match=rf"^{re.escape(path)}: {re.escape(message)}"):
            load_state_file(path)
        with pytest.raises(ValueError, match=rf"^{re.escape(path)}: {re.escape(message)}"):
            with open_state_file(path):
                pass


@pytest.mark.parametrize("lengths, message", [
    ([1, 1, 1, 1], None),
    ([1, 0, 1, 1], r"feature 'user_id', row 1: 0 ids; expected exactly one"),
    ([1, 1, 1, 2], r"feature 'item_id', row 1: 2 ids; expected exactly one"),
    ([2, 0, 1, 1], r"feature 'user_id', row 0: 2 ids"),  # the lengths still add up to the ids
])
def test_single_id_features_take_one_id_per_row_in_any_key_order(lengths, message):
    """Every feature single-id (one min / max over the lengths) as well as mixed with a sequence."""
    from recsys_llm.id_rules import IdRules

    for keys in (["user_id", "item_id"], ["user_id", "item_id", "tags"], ["tags", "user_id", "item_id"]):
        tag_lengths = [2, 0] if "tags" in keys else []  # a sequence's bags hold any number of ids
        per_key = {"user_id": lengths[:2], "item_id": lengths[2:], "tags": tag_lengths}
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=torch.ones(sum(lengths) + sum(tag_lengths), dtype=torch.int64),
            lengths=torch.tensor([n for key in keys for n in per_key[key]], dtype=torch.int32))
        # the rules in another order than the request's keys
        rules = IdRules({k: 5 for k in sorted(keys)}, {}, {}, {"tags": False, "item_id": True, "user_id": True})
        if message is None:
            assert rules(kjt) is kjt
        else:
            with pytest.raises(ValueError, match=message):
                rules(kjt)


def test_id_rules_make_their_tensors_on_the_requests_device():
    """meta stands for a GPU: a rule tensor made on CPU would meet CUDA ids in every request."""
    from recsys_llm.id_rules import IdRules

    rules = IdRules({"user_id": 5, "tags": 7}, {"tags": True}, {"tags": 3}, {"user_id": True})
    meta = torch.device("meta")
    rows, hashed, max_lengths, single_id = rules._per_key(("tags", "user_id"), meta)
    assert rows.is_meta and single_id.is_meta and hashed == [0] and max_lengths == [3, 0]
    cpu_rows, *_ = rules._per_key(("tags", "user_id"), torch.device("cpu"))  # cached per device
    assert cpu_rows.tolist() == [7, 5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_id_rules_on_cuda_requests():
    from recsys_llm.id_rules import IdRules

    rules = IdRules({"user_id": 5, "tags": 7}, {"tags": True}, {"tags": 2}, {"user_id": True})
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["user_id", "tags"], values=torch.tensor([1, 2, 9, 3, 4, 5]),
                                              lengths=torch.tensor([1, 1, 1, 3], dtype=torch.int32)).to("cuda")
    ruled = rules(kjt)
    assert ruled.values().tolist() == [1, 2, 2, 3, 4] and ruled.lengths().tolist() == [1, 1, 1, 2]


def test_a_state_only_export_is_named_as_such_not_as_another_format(tmp_path):
    """``recsys-llm export --state-only`` writes weights for a teacher, not a servable artifact:
    loading it says so (it said "export format None, this code reads 1")."""
    from recsys_llm.cli.export import _write_state

    _write_state({"model.w": torch.zeros(2)}, str(tmp_path / "teacher"), {})
    with pytest.raises(ValueError, match=r"teacher: a `recsys-llm export --state-only` directory: the trained task's "
                                         r"weights only \(model\.safetensors\), no tables\.json or dense program"):
        ServedModel.load(str(tmp_path / "teacher"), trust_program=True)


def test_the_rules_of_key_orders_stay_bounded_whatever_orders_clients_send() -> None:
    """One cache entry per key order a client sent (keys built from a set, or per-request JSON): 2.3 KB each, up
    to F! of them, an RSS that grew without end."""
    import itertools

    from recsys_llm.id_rules import KEY_ORDERS_CACHED, IdRules

    names = [f"f{i}" for i in range(6)]
    rules = IdRules({name: 10 for name in names}, {}, {})
    orders = list(itertools.islice(itertools.permutations(names), 3 * KEY_ORDERS_CACHED))
    usual = ("f5", "f4", "f3", "f2", "f1", "f0")  # the order most requests come in, between the others
    for keys in orders:
        for order in (keys, usual):
            kjt = KeyedJaggedTensor.from_lengths_sync(list(order), torch.arange(6), torch.ones(6, dtype=torch.int64))
            assert torch.equal(rules(kjt).values(), torch.arange(6))
    assert len(rules._per_keys) == KEY_ORDERS_CACHED  # the most recently used orders
    assert {(tuple(orders[-1]), torch.device("cpu")), (usual, torch.device("cpu"))} <= set(rules._per_keys)


def test_the_usual_key_order_is_never_pushed_out_by_rare_ones() -> None:
    """The cache drops the least recently used order: a usual order asked between rare ones keeps its entry (a
    first-in-first-out cache rebuilt it every KEY_ORDERS_CACHED requests)."""
    import itertools

    from recsys_llm.id_rules import KEY_ORDERS_CACHED, IdRules

    names = [f"f{i}" for i in range(6)]
    rules = IdRules({name: 10 for name in names}, {}, {})
    usual = ("f5", "f4", "f3", "f2", "f1", "f0")
    cpu = torch.device("cpu")
    first = rules._per_key(usual, cpu)
    for keys in itertools.islice(itertools.permutations(names), 3 * KEY_ORDERS_CACHED):
        if keys != usual:
            rules._per_key(tuple(keys), cpu)
        assert rules._per_key(usual, cpu) is first  # a hit every time, never rebuilt


def test_an_artifact_with_metadata_keyed_by_integers_loads(artifact, tmp_path) -> None:
    """JSON writes integer keys as strings, which sort otherwise ("10" before "2"): the digest of config.json's keys
    was taken of the dict as given, and the artifact just exported was refused as edited."""
    _, task = artifact
    directory = str(tmp_path / "with_metadata")
    dense, sparse = request(4, 100)
    export_task(task, directory, dense, sparse, metadata={"thresholds": {2: 0.1, 10: 0.2}, "mixed": {1: "a", "b": 2}},
                schema=SCHEMA)
    served = ServedModel.load(directory, trust_program=True)
    assert torch.isfinite(served.logits(dense, sparse)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_raw_request_of_a_model_on_the_gpu_is_on_the_gpu(tmp_path):
    """``served.predict(*served.raw_request(columns))`` of a model moved to the GPU: the request was built on the CPU
    and refused as on another device."""
    (tmp_path / "shop.yaml").write_text(yaml.safe_dump(SHOP_SCHEMA))
    prepare_tabular(_csv(tmp_path / "old.csv", _old_rows()), str(tmp_path / "shop.yaml"), str(tmp_path / "shop"))
    export_small_deepfm(DatasetSchema.load(str(tmp_path / "shop")), str(tmp_path / "artifact"), batch_size=64, steps=2)
    served = ServedModel.load(str(tmp_path / "artifact"), trust_program=True)
    columns = {name: [None if value == "" else value for value in values] for name, values in NEW.items()}
    expected = served.predict(*served.raw_request(columns))
    served.to("cuda")
    dense, kjt = served.raw_request(columns)
    assert dense.device.type == "cuda" and kjt.values().device.type == "cuda"
    torch.testing.assert_close(served.predict(dense, kjt).cpu(), expected, rtol=1e-5, atol=1e-6)
