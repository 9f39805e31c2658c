"""Weight formats below the runtime: the format registry, recipes (which tensor gets which format), layouts
in a folder, streaming safetensors I/O, the quantized linear layer and its CPU (C++) and CUDA kernels. The
``llmctl quantize`` pipeline that uses them is ``llmctl.quantize``."""
