"""recsys_llm: LLM-enhanced CTR models on sharded TorchRec.

Layers (each imports only the ones before it): ``data`` -> ``semantics`` ->
``modules`` / ``models`` -> ``train`` -> ``cli``.
"""

__version__ = "0.1.0"
