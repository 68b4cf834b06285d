from recsys_llm.cli import run

run()
