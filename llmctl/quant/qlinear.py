"""Quantized weights in llmctl's torch runtime: the model keeps the quantized bytes and multiplies with
them directly.

``QuantWeight`` is a tensor subclass (the approach of torchao's quantized tensors) that stands in for a
linear layer's ``weight``: it has the weight's shape and compute dtype but holds only the quantized parts.
``F.linear`` and ``torch.mv`` on it (and ``runtime.model.linear``, which calls ``linear`` directly) run a
quantized kernel. Decode steps (up to ``CODE_KERNEL_ROWS`` rows) on CPU:

* int4 / int4-asym and int8 whose rows and groups are whole blocks of 32 (and whose scales are fp16, as
  llmctl writes them): llmctl's integer kernels (``native.int4_linear`` / ``int8_linear``: int8 activations
  in blocks of 32, integer dot products, llama.cpp's scheme), int4 codes repacked once at load;
* fp8 and NF4: llmctl's C++ kernels on the stored codes (``native.fp8_linear`` / ``nf4_linear``);
* without the C++ build: torch's ``aten._weight_int8pack_mm`` (int8 per row) and
  ``aten._weight_int4pack_mm_for_cpu`` (int4 in groups of 32/64/128/256), in bf16.

Longer inputs (prefill), and whatever no kernel takes, dequantize the weight for that call only. On CUDA a
weight runs the kernels of ``llmctl.quant.cuda_kernels`` instead (CPU kernels never see CUDA tensors), and
``.to()`` / ``model.to()`` move it, its kernels prepared again for the new device. Any other operation
sees the dequantized weight. So ``runtime/model.py`` runs unchanged; ``load_quantized`` puts these in place
of the parameters, joins q/k/v and gate/up where the kernel allows (``concat``) and, where it is exact,
gives the model an int8 form of its logits' matrix (``lossless_int8``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llmctl.errors import UsageError
from llmctl.quant import cuda_kernels
from llmctl.quant.formats import REGISTRY
from llmctl.quant.registry import QTensor

INT4_KERNEL_GROUPS = (32, 64, 128, 256)
# The CPU kernels are fast in bf16 only (measured: int4 M=1 94 µs in bf16 vs 2.3 ms in fp32; int8 79 µs
# vs 0.87 ms), so they always take bf16 activations and scales, whatever the model's compute dtype.
KERNEL_DTYPE = torch.bfloat16
# Inputs of at most this many rows (decode steps) go through the code kernels; longer ones (prefill)
# dequantize once and run one matrix product.
CODE_KERNEL_ROWS = 8


class QuantWeight(torch.Tensor):
    """A (out_features, in_features) weight held quantized; see the module docstring."""

    q: QTensor
    kernel: str  # "int4-codes", "int8-codes", "int8pack", "int4pack", "fp8-codes", "nf4-codes", "dequantize"
    # (or one of llmctl.quant.cuda_kernels.KERNELS on CUDA)
    members: tuple[QuantWeight, ...] = ()  # what a joined weight (``concat``) was made of

    @staticmethod
    def __new__(cls, q: QTensor, dtype: torch.dtype) -> QuantWeight:
        device = _parts_device(q)  # where its parts are: the CPU, CUDA, or meta (a model moved there)
        return torch.Tensor._make_wrapper_subclass(cls, q.shape, dtype=dtype, device=device, requires_grad=False)

    def __init__(self, q: QTensor, dtype: torch.dtype) -> None:
        self.q = q
        self.cdtype = dtype  # a plain attribute: reading .dtype goes through __torch_function__
        self.kernel = "dequantize"
        self._kernel_args: tuple[Any, ...] = ()
        self._prepare()

    def _prepare(self) -> None:
        q, fmt = self.q, self.q.format
        f = REGISTRY[fmt]
        int8, int4 = f.family == "int" and f.bits == 8, f.family == "int" and f.bits == 4
        if self.device.type != "cpu":  # CUDA (or meta): no CPU kernel may see these tensors
            self.kernel, self._kernel_args, self.q = cuda_kernels.prepare(q, self.device)
            return
        if int8 and _codes_fit(q, "int8_linear"):
            self.kernel = "int8-codes"
            self._kernel_args = (q.parts["weight"], q.parts["scale"].reshape(q.shape[0], -1))
        elif int8 and q.group_size == q.shape[-1]:
            self.kernel = "int8pack"
            self._kernel_args = (q.parts["weight"], q.parts["scale"].reshape(-1).to(KERNEL_DTYPE))
        elif int4 and _codes_fit(q, "int4_linear"):
            codes, zp = f.codes(q)
            self.kernel = "int4-codes"
            self._kernel_args = int4_kernel_args(codes, q.parts["scale"], zp)
            self.q = QTensor(fmt, q.shape, q.group_size, {}, q.meta)  # the repacked copy replaces the codes
        elif int4 and q.group_size in INT4_KERNEL_GROUPS and len(q.shape) == 2:
            codes, zp = f.codes(q)
            try:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32) + 8, 2)
            except RuntimeError:
                return  # a shape the kernel does not take: dequantize per call
            scale = q.parts["scale"].float()  # (rows, groups)
            zero = torch.zeros_like(scale) if zp is None else -zp.float() * scale  # w = (u - 8)·s + zero
            sz = torch.stack([scale.t(), zero.t()], dim=-1).to(KERNEL_DTYPE).contiguous()  # (groups, rows, 2)
            self.kernel = "int4pack"
            self._kernel_args = (packed, q.group_size, sz)
            self.q = QTensor(fmt, q.shape, q.group_size, {}, q.meta)  # the packed copy replaces the codes
        elif f.family == "fp8" and len(q.shape) == 2:
            from llmctl.quant import native

            if native.get() is not None:
                lut = torch.arange(256, dtype=torch.uint8).view(q.parts["weight"].dtype).float()  # code -> value
                scale = q.parts["scale"].float()
                self.kernel = "fp8-codes"
                self._kernel_args = (lut, scale.reshape(-1, scale.shape[-1]))
        elif f.family == "nf4" and len(q.shape) == 2 and q.shape[-1] % q.group_size == 0:
            from llmctl.quant import native

            if native.get() is not None:
                absmax = f.absmax(q).float()  # double quantization undone once (0.5 bit/weight)
                self.kernel = "nf4-codes"
                self._kernel_args = (q.parts["quant_map"].float(), absmax)

    @classmethod
    def concat(cls, weights: list[QuantWeight]) -> QuantWeight | None:
        """One weight whose rows are those of ``weights`` (q/k/v, gate/up: one kernel call serves them all),
        made of the same bytes: each member's kernel tensors become views of the joined ones. None unless
        all run llmctl's int4 kernel with the same groups and columns."""
        first = weights[0]
        if any(w.kernel != "int4-codes" for w in weights) or len({(w.q.format, w.q.group_size, w.shape[1], w.cdtype)
                                                                   for w in weights}) != 1:  # fmt: skip
            return None
        joined = [
            torch.cat(parts) if parts[0].numel() else parts[0]
            for parts in zip(*(w._kernel_args for w in weights), strict=True)
        ]
        q = QTensor(
            first.q.format,
            (sum(w.shape[0] for w in weights), first.shape[1]),
            first.q.group_size,
            {},
            first.q.meta,
        )
        out = cls.__new__(cls, q, first.cdtype)  # no __init__: the kernel tensors are given, not prepared
        out.q, out.cdtype, out.kernel, out._kernel_args = q, first.cdtype, first.kernel, tuple(joined)
        row = 0
        for w in weights:
            n = w.shape[0]
            w._kernel_args = tuple(t[row : row + n] if t.numel() else t for t in joined)
            row += n
        out.members = tuple(weights)
        return out

    @property
    def quantized_nbytes(self) -> int:
        """Bytes this weight holds in memory (kernel tensors that share the parts' storage counted once)."""
        held = {p.untyped_storage().data_ptr() for p in self.q.parts.values()}
        extra = [t for t in self._kernel_args if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in held]
        return self.q.nbytes + sum(t.numel() * t.element_size() for t in extra)

    def to(self, *args: Any, **kwargs: Any) -> QuantWeight:  # type: ignore[override]
        """This weight on another device and/or with another compute dtype (``Tensor.to``'s arguments): the
        quantized parts move and the kernels are prepared again for the device; never dequantized."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        return self.moved(device, dtype)

    def moved(self, device: Any = None, dtype: torch.dtype | None = None) -> QuantWeight:
        """See ``to``. A weight whose kernel replaced its codes by a packed copy for one device (int4 on
        the CPU or tinygemm) cannot move to another: load the folder on that device instead."""
        device = self.device if device is None else torch.device(device)
        dtype = dtype or self.cdtype
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            if dtype == self.cdtype:
                return self
            out = QuantWeight.__new__(QuantWeight, self.q, dtype)  # the kernels stay as they are
            out.q, out.cdtype, out.kernel, out._kernel_args = self.q, dtype, self.kernel, self._kernel_args
            return out
        if not self.q.parts:
            raise UsageError(
                f"a {self.q.format} weight packed for {self.device}'s {self.kernel} kernel cannot move to "
                f"{device}; load the model with device={str(device)!r} (--device) instead"
            )
        parts = {k: v.to(device) for k, v in self.q.parts.items()}
        return QuantWeight(QTensor(self.q.format, self.q.shape, self.q.group_size, parts, self.q.meta), dtype)

    def dequantize(self) -> torch.Tensor:
        if self.kernel in cuda_kernels.KERNELS:
            return cuda_kernels.dequantize(self.kernel, self._kernel_args, self.q, self.cdtype)
        if self.kernel == "int4-codes":
            from llmctl.quant import native

            return native.get().int4_dequant(*self._kernel_args).to(self.cdtype)
        if self.kernel == "int4pack":  # multiply the identity: the kernel's own dequantization
            eye = torch.eye(self.shape[-1], dtype=KERNEL_DTYPE)
            return self._int4(eye).t().to(self.cdtype).contiguous()
        return REGISTRY[self.q.format].dequantize(self.q, self.cdtype)

    def _int4(self, x2: torch.Tensor) -> torch.Tensor:
        packed, g, sz = self._kernel_args
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, g, sz)

    def _codes(self, x2: torch.Tensor) -> torch.Tensor:
        """fp8 / NF4 rows through the C++ kernels on the stored codes (fp32 out)."""
        from llmctl.quant import native

        kernels = native.get()
        if self.kernel == "fp8-codes":
            lut, scale = self._kernel_args
            return kernels.fp8_linear(x2, self.q.parts["weight"].view(torch.uint8), lut, scale, 0)
        code, absmax = self._kernel_args
        rows = self.shape[0]
        return kernels.nf4_linear(x2, self.q.parts["weight"].reshape(-1), code, absmax, rows, self.q.group_size, 0)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel in _INT_KERNELS and x.numel() <= CODE_KERNEL_ROWS * x.shape[-1]:  # decode: the hot path
            y = _INT_KERNELS[self.kernel]()(x.reshape(-1, x.shape[-1]), *self._kernel_args, 0)
            y = y.view(*x.shape[:-1], -1) if x.dtype == torch.float32 else y.to(x.dtype).view(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        if self.kernel in cuda_kernels.KERNELS:
            y = cuda_kernels.linear(self.kernel, self._kernel_args, x)
            return y if bias is None else y + bias
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if self.kernel in ("fp8-codes", "nf4-codes") and rows <= CODE_KERNEL_ROWS:
            y = self._codes(x.reshape(-1, x.shape[-1])).to(x.dtype).reshape(*x.shape[:-1], -1)
        elif self.kernel in ("dequantize", "fp8-codes", "nf4-codes", "int4-codes", "int8-codes"):
            y = F.linear(x, self.dequantize().to(x.dtype))
        else:
            x2 = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)  # (tokens, in_features)
            if self.kernel == "int8pack":
                w, scales = self._kernel_args
                y = torch.ops.aten._weight_int8pack_mm(x2, w, scales)
            else:
                y = self._int4(x2.contiguous())
            y = y.to(x.dtype).reshape(*x.shape[:-1], -1)  # (..., out_features)
        return y if bias is None else y + bias

    def __repr__(self) -> str:
        g = f", group {self.q.group_size}" if self.q.group_size else ""
        return f"QuantWeight({self.q.format}{g}, shape={list(self.shape)}, kernel={self.kernel})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], QuantWeight) and not isinstance(args[0], QuantWeight):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return args[1].linear(args[0], bias)
        if func is torch.mv and isinstance(args[0], QuantWeight):
            return args[0].linear(args[1].reshape(1, -1)).reshape(-1)
        if func in (torch.Tensor.__repr__, torch.Tensor.__format__):
            return cls.__repr__(args[0])
        with torch._C.DisableTorchFunctionSubclass():  # attributes (shape, dtype) answer from the wrapper;
            return func(*args, **kwargs)  # operations reach __torch_dispatch__ and see the dense weight

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        return func(*_dense(args), **_dense(kwargs or {}))


def _native_kernel(name: str):
    def get():
        from llmctl.quant import native

        return getattr(native.get(), name)

    return get


# llmctl's integer decode kernels by QuantWeight.kernel (native.get() is a cached module after the first call)
_INT_KERNELS = {"int4-codes": _native_kernel("int4_linear"), "int8-codes": _native_kernel("int8_linear")}


def _codes_fit(q: QTensor, kernel: str) -> bool:
    """Whether llmctl's integer kernel ``kernel`` (``native.int4_linear`` / ``int8_linear``) takes this weight:
    2-D, rows of whole blocks of 32, groups of whole blocks, fp16 scales (what llmctl writes), the kernels
    built."""
    if len(q.shape) != 2 or q.shape[-1] % 32 or (q.group_size or q.shape[-1]) % 32:
        return False
    return q.parts["scale"].dtype == torch.float16 and _has_kernel(kernel)


def _has_kernel(name: str) -> bool:
    """Whether llmctl's C++ kernels are built and have ``name``."""
    from llmctl.quant import native

    return hasattr(native.get(), name)


def lossless_int8(w: torch.Tensor, dtype: torch.dtype) -> QuantWeight | None:
    """``w`` (rows, cols) as int8 codes in blocks of 32 with an fp16 scale each (llama.cpp's q8_0) when that
    loses nothing ``w`` holds — every weight within one unit in the last place of its own precision, as for
    the embeddings of a model converted from a q8_0 GGUF — so the logits' matrix streams a quarter of the
    fp32 bytes through ``native.int8_linear``; else None (the weight stays as it is)."""
    if w.dim() != 2 or w.shape[1] % 32 or not w.is_floating_point() or w.device.type != "cpu":
        return None
    if not _has_kernel("int8_linear"):
        return None
    rows, cols = w.shape
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}.get(w.dtype, 2.0**-23)  # relative, at most
    codes = torch.empty(rows, cols, dtype=torch.int8)
    scale = torch.empty(rows, cols // 32, dtype=torch.float16)
    for r in range(0, rows, 4096):  # in slices: fp32 temporaries of a 262k-row vocabulary would be gigabytes
        blocks = w[r : r + 4096].float().reshape(-1, cols // 32, 32)
        sc = (blocks.abs().amax(-1, keepdim=True) / 127).to(torch.float16)
        s = sc.float()
        c = torch.where(s > 0, torch.round(blocks / torch.where(s > 0, s, 1.0)), 0.0).clamp(-127, 127)
        if not bool(((c * s - blocks).abs() <= blocks.abs() * ulp).all()):
            return None
        codes[r : r + 4096] = c.reshape(-1, cols).to(torch.int8)
        scale[r : r + 4096] = sc.reshape(-1, cols // 32)
    return QuantWeight(QTensor("int8", (rows, cols), 32, {"weight": codes, "scale": scale}), dtype)


def int4_kernel_args(
    codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed, scale, zero) as ``native.int4_linear`` takes them, from signed codes (rows, cols) in [-8, 7],
    scales (rows, groups) and signed zero-points (rows, groups) or None: per block of 32 columns, byte j holds
    code j + 8 in its low nibble and code j + 16 + 8 in its high one (llama.cpp's q4 order, which the
    kernel unpacks with one mask and one shift); fp16 scales; zero-points + 8 as uint8 (empty: symmetric)."""
    rows, cols = codes.shape
    u = (codes.to(torch.int16) + 8).to(torch.uint8).view(rows, cols // 32, 2, 16)
    packed = (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(rows, cols // 2).contiguous()
    zero = (
        torch.empty(0, dtype=torch.uint8)
        if zp is None
        else (zp.to(torch.int16) + 8).to(torch.uint8).contiguous()
    )
    return packed, scale.to(torch.float16).reshape(rows, -1).contiguous(), zero


def _parts_device(q: QTensor) -> torch.device:
    parts = [t for t in q.parts.values() if isinstance(t, torch.Tensor)]
    return parts[0].device if parts else torch.device("cpu")


def _dense(obj: Any) -> Any:
    if isinstance(obj, QuantWeight):
        return obj.dequantize()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_dense(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _dense(v) for k, v in obj.items()}
    return obj


def weight_memory(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the model's weights in memory, and what the quantized ones would take dense."""
    held = dense = 0
    for module in model.modules():
        for name, t in list(module._parameters.items()) + list(vars(module).items()):
            if isinstance(t, QuantWeight):
                held += t.quantized_nbytes
                dense += t.numel() * t.element_size()
            elif isinstance(t, torch.nn.Parameter) and name in module._parameters:
                held += t.numel() * t.element_size()
                dense += t.numel() * t.element_size()
    return {"bytes": held, "dense_bytes": dense}
