"""GGUF, llama.cpp's model file: what llmctl knows about it, once, and no torch.

* ``reader`` — reading a file safely: metadata, tensor table, memory-mapped and dequantized tensor data;
* ``names`` — tensor names between Hugging Face and GGUF in both directions, and the layout llama.cpp's
  converter changes (Q/K row permutation, Gemma's norm offset);
* ``metadata`` — a config's hyper-parameters under llama.cpp's keys, the architecture names, a GGUF's keys
  copied with their types;
* ``vocab`` — the tokenizer in GGUF metadata: written from tokenizer.json, checked as llama.cpp reads it.

The torch loader is llmctl.runtime.gguf_loader and the writer (gguf-py's and llama.cpp's quantizers)
llmctl.quantize.gguf_out, in the layers that may import torch and llama.cpp.
"""
