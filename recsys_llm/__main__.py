"""``python -m recsys_llm``: the ``recsys-llm`` command (as ``python -m recsys_llm.cli``)."""

import sys

from recsys_llm.cli import main

sys.exit(main())
