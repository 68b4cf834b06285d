"""``python -m recsys_llm``: the ``recsys-llm`` command (as ``python -m recsys_llm.cli``)."""

from recsys_llm.cli import run

run()
