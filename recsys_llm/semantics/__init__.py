"""Offline LLM work: text templates, encoders, SSFT, CTR-adapted LLM, vector stores."""
