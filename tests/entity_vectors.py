"""Entity vectors for tests: rows of a given table written as a ``semantics export --granularity entity`` output
(``VectorExport``), without an LLM."""

import numpy as np
import pyarrow as pa
import torch

from recsys_llm.semantics.vector_export import VectorExport, VectorExportConfig


def export_entity_table(directory: str, table: np.ndarray, model: str = "random", chunk_rows: int = 512) -> np.ndarray:
    """Writes row ``i`` of ``table`` (E, d) as the vector of entity id ``i`` into ``directory`` (``model``: the
    provenance's model); returns ``table`` as float32.

    Example::

        vectors = export_entity_table(str(tmp_path / "items"), np.random.default_rng(0).normal(size=(50, 8)))
    """
    table = np.asarray(table, dtype=np.float32)
    VectorExport(directory, {"model": model, "granularity": "entity"}, VectorExportConfig(chunk_rows=chunk_rows)).run(
        pa.array(np.arange(len(table)), pa.int64()), lambda a, b: [str(i) for i in range(a, b)],
        lambda texts: torch.from_numpy(table[[int(t) for t in texts]]), progress=False)
    return table
