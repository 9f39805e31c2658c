"""llmctl: estimate, quantize, chat with and evaluate language models locally."""

__version__ = "0.1.0"
