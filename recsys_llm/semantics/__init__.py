"""Offline LLM work: text templates, encoders, SSFT, CTR-adapted LLM, vector stores.

Nothing is imported here (the package would pull in transformers and peft); import from the modules:
``recsys_llm.semantics.encoder.TextEncoder``, ``.ssft`` (SSFT), ``.field_vectors`` (LLaCTR's field vectors),
``.ctr_llm.CTRAdaptedLLM`` (ELEC's LLM), ``.vector_export`` / ``.vector_reader`` (row and entity vectors),
``.store`` (vector files with their provenance).
"""
