"""Quantization: the format registry, recipes, converters and writers per output layout, kernels."""
