"""The ``llmctl quantize`` pipeline: plan which tensor gets which format, calibrate on text through the
runtime model (activation statistics, GPTQ Hessians), and write the output (Hugging Face layouts or GGUF).
The formats themselves, their kernels and the quantized linear layer are ``llmctl.quant``, below the
runtime; this package sits above it."""
