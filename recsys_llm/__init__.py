"""recsys_llm: LLM-enhanced CTR models on sharded TorchRec.

Layers (each imports at module level only its own and the ones before it; docs/design.md):
leaf helpers -> ``data`` -> ``models`` -> ``semantics`` -> ``modules`` -> ``train`` -> ``serving`` -> ``cli``.
"""

import os

__version__ = "0.1.0"

# the configs installed with the package (the checkout's configs/ holds them all)
PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
