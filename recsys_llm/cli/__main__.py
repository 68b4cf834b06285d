import sys

from recsys_llm.cli import main

sys.exit(main())
