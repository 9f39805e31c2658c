"""Memory model behind ``llmctl estimate-memory``: tensor shapes from a config, exact weight bytes per
format, KV cache, activations and overhead, and a table of GPUs. Pure functions; no torch."""

from llmctl.memory.estimate import (
    KV_DTYPES,
    KV_LAYOUTS,
    Estimate,
    Scenario,
    WeightsBreakdown,
    estimate,
    kv_cache_bytes,
    max_batch_that_fits,
    max_context_that_fits,
    weights_breakdown,
)
from llmctl.memory.gpus import GPU, GPUS, find_gpu
from llmctl.tensors import TensorShape, count_parameters, tensor_shapes

__all__ = [
    "GPU",
    "GPUS",
    "KV_DTYPES",
    "KV_LAYOUTS",
    "Estimate",
    "Scenario",
    "TensorShape",
    "WeightsBreakdown",
    "count_parameters",
    "estimate",
    "find_gpu",
    "kv_cache_bytes",
    "max_batch_that_fits",
    "max_context_that_fits",
    "tensor_shapes",
    "weights_breakdown",
]
