"""Reading a DCP checkpoint without running its code: ``.metadata`` unpickled with only DCP's own classes,
data files only inside the checkpoint directory, non-tensor items through ``torch.load(weights_only=True)``,
and the errors that tell a damaged checkpoint from one of another model."""

import io
import os
import pickle
import re
from typing import Any, Dict

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from recsys_llm.error_text import weights_only_reason
from recsys_llm.paths import file_problem, is_plain_file_name, not_a_regular_file


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP load planner that reads non-tensor items with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# every global DCP's ``.metadata`` pickle refers to (torch dtypes are allowed by type)
_METADATA_GLOBALS = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
    )]
    + [
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    ]
)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` with only the classes DCP itself writes there, so a
    crafted file cannot call anything else (``pickle.load`` would run any callable)."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        # Python 3.13 defines pathlib's classes in pathlib._local, and pickles them under that name; pathlib
        # itself still has them, so a checkpoint written on 3.13+ also loads on 3.10-3.12
        known = "pathlib" if module == "pathlib._local" else module
        if (known, name) in _METADATA_GLOBALS:
            return super().find_class(known, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"{self._path}: refers to {module}.{name}, which is not part of checkpoint metadata; "
            "refusing to load it (a checkpoint holds only tensors and DCP's metadata classes)"
        )


def _require_own_data_files(path: str, metadata: Metadata) -> None:
    """Refuses a ``.metadata`` whose items lie in files other than the checkpoint directory's own:
    DCP reads each item from ``<checkpoint>/<relative_path>``, so an absolute path or a ``..`` in
    a crafted one would load another file's bytes (anything the user can read) into the weights.
    DCP itself writes plain file names (``__0_0.distcp``).

    Raises:
        ValueError: naming the ``.metadata`` file and the path it names.
    """
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = getattr(info, "relative_path", None)
        if not is_plain_file_name(name):
            raise ValueError(
                f"{path}: names the data file {name!r}, outside the checkpoint directory; expected plain file "
                "names of the checkpoint's own files (DCP writes __<rank>_<n>.distcp): refusing to read it"
            )
        # a link of the checkpoint directory to a file elsewhere reads that file's bytes as a ``..`` would
        directory = os.path.realpath(os.path.dirname(path))
        target = os.path.realpath(os.path.join(os.path.dirname(path), name))
        if os.path.commonpath([directory, target]) != directory:
            raise ValueError(
                f"{os.path.join(os.path.dirname(path), name)}: a symbolic link to {target}, outside the checkpoint "
                "directory; a checkpoint's data files are its own: refusing to read it (copy the checkpoint with its "
                "files, `cp -rL`, if you trust that target)"
            )
        found = not_a_regular_file(target)
        if found is not None:  # a FIFO would block DCP's read for good
            raise ValueError(
                f"{os.path.join(os.path.dirname(path), name)}: is {found}, not a file; expected the checkpoint's data "
                "file that DCP wrote: a damaged checkpoint; delete its checkpoint directory to resume from the one "
                "before"
            )


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the ``.metadata`` read by :class:`MetadataUnpickler`, once per
    file (``load_checkpoint`` reads it before ``dcp.load`` asks for it again)."""

    def __init__(self, path: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(path, *args, **kwargs)
        self._metadata_by_path: Dict[str, Metadata] = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        path = os.path.join(str(self.path), name)
        if path not in self._metadata_by_path:
            problem = file_problem(path)
            if problem not in (None, "missing"):  # a directory, a FIFO (a read would wait for good), a dangling link
                raise damaged_checkpoint_error(path, ValueError(f"{problem}, expected the checkpoint's index of its "
                                                                "tensors (a file)"))
            if problem is not None:
                raise FileNotFoundError(
                    f"{path}: missing: the checkpoint's index of its tensors, a hidden file that a copy made with "
                    "`cp checkpoint/*` leaves out (copy the directory whole: cp -r); a checkpoint of a run without "
                    "it is incomplete: delete its checkpoint directory to resume from the one before"
                )
            with open(path, "rb") as handle:
                try:
                    self._metadata_by_path[path] = MetadataUnpickler(handle, path).load()
                except pickle.UnpicklingError as error:
                    if path in str(error):  # refused: it names a callable outside DCP's metadata
                        raise
                    raise damaged_checkpoint_error(path, error) from error
                except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
                    raise damaged_checkpoint_error(path, error) from error
        metadata = self._metadata_by_path[path]
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path}: expected DCP Metadata, got {type(metadata).__name__}")
        _require_own_data_files(path, metadata)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


# DCP's planner errors for a checkpoint of another model (or code version), not a damaged one
_OTHER_MODEL_ERRORS = ("Size mismatch", "Missing key in checkpoint", "Unexpected key")


def require_no_weights_beyond(path: str, metadata: Metadata, model_state: Dict[str, Any]) -> None:
    """Refuses a checkpoint holding model weights that ``model_state`` has no place for: DCP loads
    only the keys it is asked for and skips the others without a word, so a checkpoint of a larger
    model (an LLaCTR run's FIE term, a teacher beside a backbone) loaded into the model without them
    would evaluate another model than the one trained.

    Raises:
        ValueError: naming the checkpoint and the first weights this model lacks.
    """
    expected = {f"model.{key}" for key in model_state}

    def in_model(key: str) -> bool:  # a key itself, or an item DCP flattened out of one (``model.<key>.<part>``)
        parts = key.split(".")
        return any(".".join(parts[:end]) in expected for end in range(2, len(parts) + 1))

    extra = sorted(key for key in metadata.state_dict_metadata if key.startswith("model.") and not in_model(key))
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        names = ", ".join(key[len("model."):] for key in extra[:3]) + more
        raise ValueError(f"{path}: holds a checkpoint of another model or code version (weights this model does not "
                         f"have: {names}); load it with the config it was trained with, or train into another run "
                         "directory")


def damaged_checkpoint_error(path: str, error: BaseException) -> ValueError:
    """The error for a checkpoint file that cannot be read back (DCP's CheckpointException is
    unwrapped to a failing rank's own error)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        error = next(iter(failures.values()))[0]
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    refusal = weights_only_reason(error)
    if refusal is not None:  # torch's first line is advice on how to load it anyway
        return ValueError(f"{path}: refused: holds objects other than tensors ({refusal}); nothing from it ran: a "
                          "damaged or tampered checkpoint; delete its checkpoint directory to resume from the one before")
    if first_line.startswith("Size mismatch") and re.search(r" for optim\.\S*\.momentum1\b", first_line):
        # torchrec's row-wise state of a column-wise table holds rows x column shards values, which DCP cannot re-cut
        return ValueError(f"{path}: its table optimizer state does not fit this sharding plan ({first_line}): "
                          "row_wise_adagrad keeps one value per row of each column shard, so it loads only into a plan "
                          "that splits that table's columns into as many shards; shard as the run did "
                          "(sharding.plan_file: the run's sharding_plan.json), or load the weights alone, without the "
                          "optimizer")
    if any(marker in text for marker in _OTHER_MODEL_ERRORS):
        hint = ""
        if "key in checkpoint state_dict: optim." in first_line:
            hint = (" (its table optimizer state has other names: another optim.sparse, or a table replicated "
                    "(data_parallel) in one sharding plan and sharded in the other)")
        return ValueError(f"{path}: holds a checkpoint of another model or code version ({first_line}){hint}; load "
                          "it with the config it was trained with, or train into another run directory")
    return ValueError(f"{path}: cannot be read back ({first_line}): a damaged or incomplete checkpoint; delete "
                      "its checkpoint directory to resume from the one before")
