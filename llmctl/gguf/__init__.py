"""GGUF, llama.cpp's model file: what llmctl knows about it, once, and no torch.

* ``reader`` — reading a file safely: metadata, tensor table, memory-mapped and dequantized tensor data;
* ``names`` — tensor names between Hugging Face and GGUF in both directions, and the layout llama.cpp's
  converter changes (Q/K row permutation, Gemma's norm offset);
* ``metadata`` — a config's hyper-parameters under llama.cpp's keys, the architecture names, a GGUF's keys
  copied with their types;
* ``vocab`` — the tokenizer in GGUF metadata: written from tokenizer.json, checked as llama.cpp reads it;
* ``writer`` — writing a file from a ``GGUFSource`` (a GGUF file's here), each tensor encoded by the caller.

The torch loader is llmctl.runtime.gguf_loader. What is written is chosen in the layers that may import torch
and llama.cpp: llmctl.quantize.gguf_out (each tensor's type; ggml's C quantizer; llama.cpp's quantizer) and
llmctl.quantize.gguf_source (a Hugging Face folder as a source).
"""
