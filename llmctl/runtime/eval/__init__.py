"""``llmctl eval``'s parts, one job per module; ``llmctl.runtime.perplexity.evaluate`` puts them together.

* ``windows``: the three protocols' windows over the tokenized text (what is fed, which rows are scored);
* ``scorers``: the backends that turn each window into log-probabilities (torch, llama.cpp, vLLM), and
  ``open_scorer``, which picks one;
* ``logprobs``: log-probability rows (full, or top-k as vLLM and a saved baseline give them), KL per row,
  and ``score_windows``, the loop from windows to per-token results;
* ``logits_file``: the ``--save-logits`` / ``--baseline-logits`` file (top-k log-probs as safetensors);
* ``stats``: perplexity.cpp's statistics over the per-token results (pure numpy).
"""
