"""The DeepCTR-Torch side of ``benchmarks/peers.py``; runs in the peer venv, driven over a pipe.

``peers.py`` starts it with the peer venv's Python (``scripts/peer_venv.sh``), which has torch,
numpy and ``deepctr-torch`` but neither torchrec nor this project::

    .venv-peers/bin/python benchmarks/peer_deepctr.py

It reads one JSON request per line on stdin and answers each with one JSON line on the
original stdout; everything DeepCTR-Torch prints is sent to stderr. Requests:

* ``{"cmd": "setup", "spec": {...}}`` loads the exported splits (``.npz``, one array per field
  and ``label``) and builds one ``deepctr_torch.models.DeepFM`` per driver, each seeded with
  ``spec["seed"]``;
* ``{"cmd": "epoch", "driver": "fit" | "loop", "epoch": e}`` trains that driver's model for
  one epoch over the training split and answers its steady-state samples/s;
* ``{"cmd": "predict", "driver": d, "split": s, "out": path}`` writes the model's click
  probabilities on split ``s`` to ``path`` (``.npy``, (N,) float32, file row order);
* ``{"cmd": "quit"}``.

Answers carry ``"ok": true`` or ``"ok": false`` with ``"error"`` (the traceback).

The two drivers train the same model the same way (BCE summed over the batch, as DeepCTR's
``fit`` does; Adagrad for every embedding table, Adam for the rest):

* ``fit``: DeepCTR-Torch's own ``model.fit`` (``DataLoader`` over a ``TensorDataset``,
  shuffled), exactly as its users train;
* ``loop``: a hand loop over the same model and optimizer on one prebuilt float32 tensor of
  all rows, batches gathered with one index op (no per-sample ``DataLoader`` collation):
  the fastest way we found to drive DeepCTR-Torch's model.

Steady state: the clock starts when ``warmup_steps`` steps have run and stops after the last
step of the epoch; samples/s = samples of the timed steps / that time.
"""

import json
import os
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, TextIO

import numpy as np
import torch
import torch.nn.functional as F

FLOAT32_EXACT_INT = 1 << 24  # DeepCTR-Torch carries ids in a float tensor


class TwoOptimizers:
    """Adagrad for the embedding tables, Adam for the rest, behind the one-optimizer interface.

    DeepCTR-Torch's ``compile``/``fit`` take one optimizer object and only call its
    ``zero_grad()`` and ``step()``; the project trains tables with (fused) Adagrad and the
    dense part with Adam, so the peer gets the same split.

    Args:
        model (torch.nn.Module): a DeepCTR-Torch model.
        sparse_lr (float): Adagrad learning rate of the tables.
        dense_lr (float): Adam learning rate of everything else.
        eps (float): epsilon of both.
    """

    def __init__(self, model: torch.nn.Module, sparse_lr: float, dense_lr: float, eps: float) -> None:
        table_ids = {
            id(module.weight) for module in model.modules() if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
        }
        tables = [p for p in model.parameters() if id(p) in table_ids]
        dense = [p for p in model.parameters() if id(p) not in table_ids]
        if not tables or not dense:
            raise ValueError(f"expected embedding tables and dense weights, got {len(tables)} tables, {len(dense)} dense")
        self._optimizers = [
            torch.optim.Adagrad(tables, lr=sparse_lr, eps=eps),
            torch.optim.Adam(dense, lr=dense_lr, eps=eps),
        ]
        self.num_table_params = sum(p.numel() for p in tables)
        self.num_dense_params = sum(p.numel() for p in dense)

    def zero_grad(self) -> None:
        for optimizer in self._optimizers:
            optimizer.zero_grad()

    def step(self) -> None:
        for optimizer in self._optimizers:
            optimizer.step()


def feature_columns(spec: Dict[str, Any]) -> List[Any]:
    """DeepCTR-Torch feature columns for the exported fields (sparse, sequence, dense)."""
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat

    dim = int(spec["embedding_dim"])
    columns: List[Any] = []
    for field in spec["fields"]:
        kind, name = field["kind"], field["name"]
        if kind == "sparse":
            columns.append(SparseFeat(name, vocabulary_size=int(field["cardinality"]), embedding_dim=dim))
        elif kind == "sequence":
            # mean over the non-padding ids (0 pads), as the project's MEAN-pooled sequence tables
            columns.append(VarLenSparseFeat(SparseFeat(name, vocabulary_size=int(field["cardinality"]), embedding_dim=dim),
                                            maxlen=int(field["max_length"]), combiner="mean"))
        elif kind == "dense":
            columns.append(DenseFeat(name, 1))
        else:
            raise ValueError(f"field {name!r}: unknown kind {kind!r} (expected sparse, sequence or dense)")
    return columns


def load_split(path: str, fields: List[Dict[str, Any]]) -> Dict[str, np.ndarray]:
    """Loads one exported split: ``{field name: (N,) or (N, L) array, "label": (N,) float32}``."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    missing = [f["name"] for f in fields if f["name"] not in arrays] + ([] if "label" in arrays else ["label"])
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}")
    for field in fields:
        if field["kind"] != "dense":
            top = int(arrays[field["name"]].max(initial=0))
            if top >= FLOAT32_EXACT_INT:
                raise ValueError(f"{path}: field {field['name']!r} has id {top} >= 2**24, which DeepCTR-Torch's float input "
                                 "cannot carry exactly")
    return arrays


class Peer:
    """The DeepCTR-Torch models and data of one benchmark run."""

    def __init__(self, spec: Dict[str, Any]) -> None:
        from deepctr_torch.models import DeepFM

        # before any multi-threaded op, as the project's side does (its --keep-denormals)
        flush = bool(spec.get("flush_denormal", False))
        self.flush_denormal = torch.set_flush_denormal(flush) and flush  # it answers whether the CPU has the mode
        torch.set_num_threads(int(spec["threads"]))
        self._spec = spec
        self._device = spec["device"]
        self._batch_size = int(spec["batch_size"])
        self._warmup = int(spec["warmup_steps"])
        fields = spec["fields"]
        self._splits = {name: load_split(path, fields) for name, path in spec["splits"].items()}
        columns = feature_columns(spec)
        self.models: Dict[str, Any] = {}
        self.optimizers: Dict[str, TwoOptimizers] = {}
        for driver in ("fit", "loop"):
            model = DeepFM(
                columns, columns,
                dnn_hidden_units=tuple(spec["mlp_layer_sizes"]),
                l2_reg_linear=0.0, l2_reg_embedding=0.0, l2_reg_dnn=0.0,  # the project side has no weight decay
                dnn_dropout=float(spec["dropout"]), seed=int(spec["seed"]), task="binary", device=self._device,
            )
            optimizer = TwoOptimizers(model, float(spec["sparse_lr"]), float(spec["dense_lr"]), float(spec["eps"]))
            model.compile(optimizer, "binary_crossentropy", metrics=None)
            self.models[driver], self.optimizers[driver] = model, optimizer
        order = list(self.models["fit"].feature_index)
        self._order = order
        train = self._splits["train"]
        # the hand loop's input: all rows as one float32 tensor in the model's column order (N, C)
        self._x_train = torch.from_numpy(np.concatenate(
            [np.asarray(train[name], dtype=np.float32).reshape(len(train["label"]), -1) for name in order], axis=1
        )).to(self._device)
        self._y_train = torch.from_numpy(np.asarray(train["label"], dtype=np.float32)).to(self._device)
        self._loop_generator = torch.Generator().manual_seed(int(spec["seed"]))

    def _sync(self) -> None:
        if str(self._device).startswith("cuda"):
            torch.cuda.synchronize()

    def _inputs(self, split: str) -> Dict[str, np.ndarray]:
        arrays = self._splits[split]
        return {name: arrays[name] for name in self._order}

    def describe(self) -> Dict[str, Any]:
        import deepctr_torch

        optimizer = self.optimizers["fit"]
        return {
            "deepctr_torch": deepctr_torch.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "threads": torch.get_num_threads(),
            "flush_denormal": self.flush_denormal,
            "table_params": optimizer.num_table_params,
            "dense_params": optimizer.num_dense_params,
            "train_rows": int(self._y_train.numel()),
            "columns": int(self._x_train.shape[1]),
        }

    def _rate(self, samples: int, steps: int, seconds: float, epoch_seconds: float, loss: float) -> Dict[str, Any]:
        measured = samples - self._warmup * self._batch_size
        if steps <= self._warmup or measured <= 0 or seconds <= 0:
            raise ValueError(f"epoch of {steps} steps is too short for {self._warmup} warm-up steps")
        return {"samples_per_second": measured / seconds, "measured_samples": measured, "measured_seconds": seconds,
                "steps": steps, "epoch_seconds": epoch_seconds, "mean_loss": loss}

    def epoch_fit(self, epoch: int) -> Dict[str, Any]:
        """One epoch of DeepCTR-Torch's own ``fit`` (timed from the start of step warmup+1)."""
        from deepctr_torch.callbacks import Callback

        model = self.models["fit"]
        clock: Dict[str, float] = {}
        calls = {"forward": 0}

        def pre_forward(module: torch.nn.Module, inputs: Any) -> None:
            calls["forward"] += 1
            if calls["forward"] == self._warmup + 1:
                self._sync()
                clock["start"] = time.perf_counter()

        class EpochClock(Callback):
            def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
                clock["begin"] = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
                clock["end"] = time.perf_counter()

        handle = model.register_forward_pre_hook(pre_forward)
        try:
            history = model.fit(self._inputs("train"), self._splits["train"]["label"], batch_size=self._batch_size,
                                epochs=epoch + 1, initial_epoch=epoch, verbose=0, shuffle=True, callbacks=[EpochClock()])
        finally:
            handle.remove()
        samples = int(len(self._splits["train"]["label"]))
        # the timed steps are warmup+1 .. last; their samples are all but the first `warmup` batches
        return self._rate(samples, calls["forward"], clock["end"] - clock["start"], clock["end"] - clock["begin"],
                          float(history.history["loss"][-1]))

    def epoch_loop(self, epoch: int) -> Dict[str, Any]:
        """One epoch of the hand loop over DeepCTR-Torch's model (same step as ``fit``'s)."""
        model, optimizer = self.models["loop"], self.optimizers["loop"]
        model.train()
        x, y, batch = self._x_train, self._y_train, self._batch_size
        order = torch.randperm(x.shape[0], generator=self._loop_generator).to(x.device)
        begin = time.perf_counter()
        start, steps, loss_sum = begin, 0, 0.0
        for first in range(0, x.shape[0], batch):
            index = order[first:first + batch]
            x_batch, y_batch = x[index], y[index]  # (B, C), (B,)
            y_pred = model(x_batch).squeeze(-1)  # (B,) probabilities
            optimizer.zero_grad()
            loss = F.binary_cross_entropy(y_pred, y_batch, reduction="sum")
            total = loss + model.get_regularization_loss() + model.aux_loss
            loss_sum += float(total.item())
            total.backward()
            optimizer.step()
            steps += 1
            if steps == self._warmup:
                self._sync()
                start = time.perf_counter()
        self._sync()
        end = time.perf_counter()
        return self._rate(int(x.shape[0]), steps, end - start, end - begin, loss_sum / x.shape[0])

    def predict(self, driver: str, split: str, out: str) -> Dict[str, Any]:
        model = self.models[driver]
        start = time.perf_counter()
        probabilities = model.predict(self._inputs(split), batch_size=int(self._spec["eval_batch_size"]))
        np.save(out, probabilities.reshape(-1).astype(np.float32))
        return {"rows": int(probabilities.shape[0]), "seconds": time.perf_counter() - start}


def serve(requests: TextIO, answers: TextIO) -> None:
    """Answers requests until ``quit`` or end of input."""
    peer: Optional[Peer] = None
    for line in requests:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            command = request["cmd"]
            if command == "quit":
                answer: Dict[str, Any] = {}
            elif command == "setup":
                peer = Peer(request["spec"])
                answer = peer.describe()
            elif peer is None:
                raise RuntimeError(f"{command!r} before 'setup'")
            elif command == "epoch":
                driver = request["driver"]
                if driver not in ("fit", "loop"):
                    raise ValueError(f"unknown driver {driver!r} (expected 'fit' or 'loop')")
                epoch = int(request["epoch"])
                answer = peer.epoch_fit(epoch) if driver == "fit" else peer.epoch_loop(epoch)
            elif command == "predict":
                answer = peer.predict(request["driver"], request["split"], request["out"])
            else:
                raise ValueError(f"unknown command {command!r}")
            answers.write(json.dumps({"ok": True, **answer}) + "\n")
        except Exception:  # noqa: BLE001 -- the driver needs every failure as an answer
            answers.write(json.dumps({"ok": False, "error": traceback.format_exc()}) + "\n")
            command = None
        answers.flush()
        if command == "quit":
            return


def _protocol_streams() -> TextIO:
    """Keeps the real stdout for answers and sends fd 1 (DeepCTR's prints) to stderr."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return answers


if __name__ == "__main__":
    serve(sys.stdin, _protocol_streams())
