"""The torch runtime: one Llama-family Transformer, its KV cache, loaders and generation.

Import the submodules (``llmctl.runtime.model``, ``.loader``, ``.generate`` …); this package itself
imports nothing heavy.
"""
