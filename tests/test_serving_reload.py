"""A hot reload: ``ServedModel.load`` of a directory that an export replaces meanwhile gets one export whole."""

import os
import shutil
import threading
from typing import Tuple

import pytest
import torch

import recsys_llm.serving.served_model as served_model
from recsys_llm.atomic_dir import replace_directory, swapped_out_path
from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.serving import ServedModel, export_task
from tests.test_serving_requests import CPU, SCHEMA, request


def _export(seed: int, directory: str) -> torch.Tensor:
    """Exports a DeepFM of ``seed`` into ``directory``; its served probabilities of ``request(4, 7)``."""
    torch.manual_seed(seed)
    task = CTRTask(build_backbone(SMOKE_CONFIGS["deepfm"], SCHEMA, device=CPU)).eval()
    config = export_task(task, directory, *request(4, 100), schema=SCHEMA)
    assert config["dense_program"] == "dense_program.pt2", config["dense_program_error"]
    return ServedModel.load(directory, trust_program=True).predict(*request(4, 7))


@pytest.fixture(scope="module")
def two_exports(tmp_path_factory) -> Tuple[str, torch.Tensor, str, torch.Tensor]:
    root = tmp_path_factory.mktemp("reload")
    old, new = str(root / "old"), str(root / "new")
    return old, _export(0, old), new, _export(1, new)


def _swap_in(new: str, served: str) -> None:
    """What ``export --output served`` does as it ends: a finished copy swapped in whole."""
    tmp = f"{served}.tmp-copy"
    shutil.copytree(new, tmp)
    replace_directory(tmp, served, swapped_out_path(served))


def test_a_load_during_which_an_export_swaps_the_directory_loads_the_new_export(two_exports, tmp_path, monkeypatch):
    old, old_scores, new, new_scores = two_exports
    assert not torch.equal(old_scores, new_scores)
    served = str(tmp_path / "serving dir")
    shutil.copytree(old, served)
    real_safe_open, swaps = served_model.safe_open, []

    def safe_open_after_a_swap(*args, **kwargs):  # config.json read from the old export, the weights from the new
        if not swaps:
            swaps.append(1)
            _swap_in(new, served)
        return real_safe_open(*args, **kwargs)

    monkeypatch.setattr(served_model, "safe_open", safe_open_after_a_swap)
    model = ServedModel.load(served, trust_program=True)  # before: ValueError "mixes files of two exports"
    assert swaps and torch.equal(model.predict(*request(4, 7)), new_scores)


def test_a_load_between_the_two_renames_of_a_swap_waits_for_the_new_directory(two_exports, tmp_path):
    old, _, new, new_scores = two_exports
    served = str(tmp_path / "served")
    shutil.copytree(old, served)
    tmp = f"{served}.tmp-copy"
    shutil.copytree(new, tmp)
    os.replace(served, swapped_out_path(served))  # the swap's first rename: no directory at the path for a moment
    second = threading.Timer(0.02, lambda: os.replace(tmp, served))
    second.start()
    try:
        model = ServedModel.load(served, trust_program=True)  # before: FileNotFoundError
    finally:
        second.join()
    assert torch.equal(model.predict(*request(4, 7)), new_scores)


def test_a_missing_directory_is_still_refused_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ServedModel.load(str(tmp_path / "absent"), trust_program=True)


def test_a_damaged_artifact_is_still_refused(two_exports, tmp_path):
    old = two_exports[0]
    served = str(tmp_path / "served")
    shutil.copytree(old, served)
    with open(os.path.join(served, "model.safetensors"), "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="damaged"):
        ServedModel.load(served, trust_program=True)


def test_loads_in_two_threads_at_once_each_get_their_model(two_exports, monkeypatch):
    """torch.export.load reads a program with one module-global deserializer (_CURRENT_DESERIALIZER): a second
    load that began while the first was reading (a reload beside another, artifacts loaded side by side in
    threads) raised AssertionError("_CURRENT_DESERIALIZER is already set"). Here the first load holds torch's
    deserializer, at its first tensor, until the second has reached it too (or 1 s has passed, as when loads take
    turns)."""
    from torch._export.serde import serialize

    old, old_scores, new, new_scores = two_exports
    deserializer = serialize.GraphModuleDeserializer
    real_deserialize, real_tensor_meta = deserializer.deserialize, deserializer.deserialize_tensor_meta
    second_reading, first, waited = threading.Event(), threading.Lock(), threading.Event()

    def deserialize(self, *args, **kwargs):
        if not first.acquire(blocking=False):  # the second load
            second_reading.set()
        return real_deserialize(self, *args, **kwargs)

    def tensor_meta(self, *args, **kwargs):  # inside the first load's read, while the global names its reader
        if not waited.is_set():  # once: the first tensor of the first load
            waited.set()
            second_reading.wait(timeout=1.0)
        return real_tensor_meta(self, *args, **kwargs)

    monkeypatch.setattr(deserializer, "deserialize", deserialize)
    monkeypatch.setattr(deserializer, "deserialize_tensor_meta", tensor_meta)
    results, errors = {}, []

    def load(directory: str) -> None:
        try:
            results[directory] = ServedModel.load(directory, trust_program=True).predict(*request(4, 7))
        except Exception as error:  # noqa: BLE001 (reported by the assert below)
            errors.append(error)

    threads = [threading.Thread(target=load, args=(directory,)) for directory in (old, new)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads) and not errors, errors
    assert torch.equal(results[old], old_scores) and torch.equal(results[new], new_scores)
