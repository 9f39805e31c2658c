"""Every weight format, registered: importing this module imports each format module, so code that looks a
format up by name imports ``REGISTRY`` from here and finds none missing.

One job a module: ``registry`` (the base class, ``REGISTRY``, ``QTensor``), ``search`` (the scale search),
``float_formats`` (fp32, fp16, bf16, fp8), ``int_formats`` (int8, int4, int4-asym), ``nf4`` (nf4, nf4-dq)
and ``ggml_types`` (the GGUF tensor types). ``REGISTRY`` lists formats in import order (the order of the
imports below): floats and fp8, then the integer formats, then nf4.
"""

from __future__ import annotations

from llmctl.errors import QuantError
from llmctl.quant import float_formats, ggml_types, int_formats, nf4  # noqa: F401 (registers the formats)
from llmctl.quant.registry import PER_TENSOR, REGISTRY, QTensor, WeightFormat

__all__ = ["PER_TENSOR", "REGISTRY", "QTensor", "WeightFormat", "find_format"]


def find_format(**facts: object) -> str:
    """The name of the one format with these facts (``family``, ``bits``, ``zero_bits``, ``double_quant``):
    how a reader names what another engine's file describes in its own words."""
    names = [n for n, f in REGISTRY.items() if all(getattr(f, k) == v for k, v in facts.items())]
    if len(names) != 1:
        raise QuantError(f"internal error: {len(names)} weight formats have {facts}")
    return names[0]
