"""One exception hierarchy. The CLI prints ``str(err)`` on one line and exits with code 2."""


class LlmctlError(Exception):
    """Base class of every expected failure. Its message says what is wrong and how to fix it."""

    exit_code = 2


class UsageError(LlmctlError):
    """A bad option value or combination of options."""


class SourceError(LlmctlError):
    """The MODEL argument cannot be resolved to something we can read."""


class ConfigError(LlmctlError):
    """config.json or GGUF metadata is malformed or describes something unsupported."""


class UnsupportedArchitectureError(ConfigError):
    """The model's architecture is not one llmctl handles."""


class FormatError(LlmctlError):
    """A checkpoint file (safetensors, GGUF) is corrupt, truncated or not what it claims to be."""


class TemplateError(LlmctlError):
    """A chat template that does not compile, fails, breaks the sandbox's rules or exceeds its bounds."""


class QuantError(LlmctlError):
    """A quantization request that cannot be carried out (format, group size, layout)."""


class NotAvailableError(LlmctlError):
    """A command or feature that this version of llmctl does not provide yet."""
