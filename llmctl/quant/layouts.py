"""How quantized tensors are laid out in a Hugging Face folder, per engine (docs/formats.md has the bytes).

A layout maps each tensor of the plan (a name, a registry format, a shape, a group size) to the safetensors
entries that hold it, converts the parts a format's ``quantize`` returns into those entries (chunk by
chunk, rows in order), writes the ``config.json`` block that tells engines how to read them, and reads
them back into a ``QTensor`` for llmctl's runtime.

* ``hf`` — plain float tensors (fp32/fp16/bf16); every layout writes unquantized tensors this way.
* ``compressed-tensors`` — int8/int4 (sym/asym) "pack-quantized", fp8 e4m3 "float-quantized"; what vLLM
  and transformers load (``quantization_config.quant_method = "compressed-tensors"``).
* ``bnb`` — bitsandbytes 4-bit serialization for nf4 / nf4-dq (``quant_method = "bitsandbytes"``).
* ``llmctl`` — any registry format: the parts as they are (``NAME`` and ``NAME.<part>``) with a
  ``quantization`` block in config.json naming each tensor's format; for combinations no engine has
  (fp8 e5m2, NF4 mixed with other formats).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llmctl.errors import FormatError, QuantError
from llmctl.quant.formats import REGISTRY, find_format
from llmctl.quant.registry import PER_TENSOR, QTensor

Out = list[tuple[str, str, tuple[int, ...]]]  # (entry name, safetensors dtype, shape)
FLOATS = tuple(n for n, f in REGISTRY.items() if f.torch_dtype)  # llmctl's float formats: fp32, fp16, bf16


@dataclass
class TensorPlan:
    """One tensor of the output: where it comes from and what it becomes."""

    name: str
    shape: tuple[int, ...]
    src_dtype: str
    format: str  # registry name
    group_size: int | None = None  # effective: None (format default / per channel), PER_TENSOR, or a size
    opts: dict[str, Any] = field(default_factory=dict)  # e.g. {"fp8": "e5m2"}
    reason: str = ""  # why it gets this format (recipe, --keep, --override, indivisible)
    src_bytes: int = 0
    dtype: str = "bfloat16"  # the dtype the model computes in (bitsandbytes records it per tensor)

    @property
    def quantized(self) -> bool:
        return not REGISTRY[self.format].is_float

    @property
    def nbytes(self) -> int:
        return REGISTRY[self.format].nbytes(self.shape, self.group_size)

    @property
    def rows_cols(self) -> tuple[int, int]:
        cols = self.shape[-1] if self.shape else 1
        return math.prod(self.shape) // cols if cols else 0, cols


def _module(name: str) -> str:
    return name.removesuffix(".weight")


def _specs(tp: TensorPlan) -> dict[str, tuple[Any, tuple[int, ...]]]:
    return REGISTRY[tp.format].part_specs(tp.shape, tp.group_size, **tp.opts)


class Layout:
    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]
    description: ClassVar[str] = ""

    def accepts(self, tp: TensorPlan) -> bool:
        return not tp.quantized or tp.format in self.formats

    def outputs(self, tp: TensorPlan) -> Out:
        from llmctl.quant.safetensors_io import st_dtype

        if not tp.quantized:
            (dtype, shape) = _specs(tp)["weight"]
            return [(tp.name, st_dtype(dtype), shape)]
        return self._outputs(tp)

    def write(self, tp: TensorPlan, chunk: QTensor, first: bool) -> list[tuple[str, Any]]:
        """Entries (name, tensor bytes to append) for the next rows of ``tp`` (``chunk``)."""
        if not tp.quantized:
            return [(tp.name, chunk.parts["weight"])]
        return self._write(tp, chunk, first)

    def config(self, plans: list[TensorPlan]) -> dict[str, Any]:
        return {}

    def problem(self, plans: list[TensorPlan]) -> str | None:
        """Why the layout cannot hold this combination of tensors (each of which it accepts), or None."""
        return None

    def _outputs(self, tp: TensorPlan) -> Out:
        raise NotImplementedError

    def _write(self, tp: TensorPlan, chunk: QTensor, first: bool) -> list[tuple[str, Any]]:
        raise NotImplementedError


class HF(Layout):
    name = "hf"
    formats = ()
    description = "plain Hugging Face safetensors (fp32/fp16/bf16)"


# ---- compressed-tensors ----------------------------------------------------------------------------
class CompressedTensors(Layout):
    """compressed-tensors 0.x (what llm-compressor writes, vLLM and transformers read).

    pack-quantized (int): ``weight_packed`` int32 (rows, ceil(cols·bits/32)) — code + 2^(bits-1) packed
    little-endian, element i at bit i·bits of its row; ``weight_scale`` (rows, groups) fp16;
    ``weight_shape`` int64 [rows, cols]; asymmetric adds ``weight_zero_point`` int32
    (ceil(rows·bits/32), groups) packed the same way along the rows.
    float-quantized (fp8 e4m3): ``weight`` F8_E4M3 (rows, cols) and ``weight_scale`` fp32 (rows, groups),
    (rows, 1) per channel or (1,) per tensor.
    """

    name = "compressed-tensors"
    formats = ("int8", "int4", "int4-asym", "fp8")
    description = "compressed-tensors pack-quantized / float-quantized (vLLM, transformers)"

    def accepts(self, tp: TensorPlan) -> bool:
        return super().accepts(tp) and tp.opts.get("fp8", "e4m3") == "e4m3"  # an fp8 variant: e4m3 only

    def problem(self, plans: list[TensorPlan]) -> str | None:
        """vLLM runs q/k/v_proj as one qkv_proj layer and gate/up_proj as one gate_up_proj, and needs one
        scheme (or all kept) for the parts of a fused layer: a file that splits them does not load there."""
        seen: dict[tuple[str, int], tuple[TensorPlan, str]] = {}
        for tp in plans:
            m = _module(tp.name)
            parent, _, leaf = m.rpartition(".")
            k = next((k for k, parts in enumerate(_FUSED) if leaf in parts), None)
            if k is None or not _is_linear_weight(tp):
                continue
            scheme = json.dumps(_ct_scheme(tp), sort_keys=True) if tp.quantized else "kept"
            first = seen.setdefault((parent, k), (tp, scheme))
            if first[1] != scheme:
                a, b = first[0], tp
                return (
                    f"vLLM fuses {'/'.join(_FUSED[k])} into one layer and needs one scheme for it, but "
                    f"{_module(a.name)} is {_what(a)} and {_module(b.name)} is {_what(b)}"
                )
        return None

    def _outputs(self, tp: TensorPlan) -> Out:
        from llmctl.quant.safetensors_io import st_dtype

        m = _module(tp.name)
        rows, cols = tp.rows_cols
        specs = _specs(tp)
        if REGISTRY[tp.format].family == "fp8":
            scale_shape = (1,) if tp.group_size == PER_TENSOR else specs["scale"][1]
            return [(f"{m}.weight", "F8_E4M3", (rows, cols)), (f"{m}.weight_scale", "F32", scale_shape)]
        bits = int(REGISTRY[tp.format].bits)
        ng = specs["scale"][1][1]
        out = [
            (f"{m}.weight_packed", "I32", (rows, math.ceil(cols * bits / 32))),
            (f"{m}.weight_scale", st_dtype(specs["scale"][0]), (rows, ng)),
            (f"{m}.weight_shape", "I64", (2,)),
        ]
        if REGISTRY[tp.format].zero_bits:
            out.append((f"{m}.weight_zero_point", "I32", (math.ceil(rows * bits / 32), ng)))
        return out

    def _write(self, tp: TensorPlan, chunk: QTensor, first: bool) -> list[tuple[str, Any]]:
        import torch

        from llmctl.quant.primitives import int32_words, pack_nibbles, unpack_nibbles

        m = _module(tp.name)
        p = chunk.parts
        if REGISTRY[tp.format].family == "fp8":
            out = [(f"{m}.weight", p["weight"])]
            if tp.group_size != PER_TENSOR or first:
                out.append(
                    (
                        f"{m}.weight_scale",
                        p["scale"].reshape(-1) if tp.group_size == PER_TENSOR else p["scale"],
                    )
                )
            return out
        if REGISTRY[tp.format].bits == 8:
            raw = (p["weight"].to(torch.int16) + 128).to(torch.uint8)  # (rows, cols) offset codes
        else:
            raw = p["weight"]  # (rows, ceil(cols/2)) low nibble first: already the packed bytes
        out = [(f"{m}.weight_packed", int32_words(raw)), (f"{m}.weight_scale", p["scale"])]
        if first:
            out.append((f"{m}.weight_shape", torch.tensor(tp.rows_cols, dtype=torch.int64)))
        if "zero_point" in p:
            rows, ng = p["scale"].shape
            zp = unpack_nibbles(p["zero_point"], rows * ng).reshape(rows, ng)  # (rows, groups) code + 8
            out.append((f"{m}.weight_zero_point", int32_words(pack_nibbles(zp.t().contiguous())).t()))
        return out

    def config(self, plans: list[TensorPlan]) -> dict[str, Any]:
        schemes: dict[str, tuple[dict[str, Any], list[str]]] = {}
        for tp in plans:
            if tp.quantized:
                key = json.dumps(_ct_scheme(tp), sort_keys=True)
                schemes.setdefault(key, (_ct_scheme(tp), []))[1].append(_module(tp.name))
        linear_kept = _linear_kept(plans)
        groups, formats = {}, set()
        for i, (scheme, modules) in enumerate(schemes.values()):
            fmt = scheme.pop("format")
            formats.add(fmt)
            targets = ["Linear"] if len(schemes) == 1 else modules
            groups[f"group_{i}"] = {"targets": targets, "weights": scheme, "input_activations": None,
                                    "output_activations": None, "format": fmt}  # fmt: skip
        return {
            "quantization_config": {
                "quant_method": "compressed-tensors",
                "format": formats.pop() if len(formats) == 1 else "mixed-precision",
                "quantization_status": "compressed",
                "config_groups": groups,
                "ignore": linear_kept,
                "kv_cache_scheme": None,
            }
        }


_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # vLLM's qkv_proj and gate_up_proj


def _linear_kept(plans: list[TensorPlan]) -> list[str]:
    """The modules of every linear layer the file leaves unquantized: the kept linear weights, and
    ``lm_head`` when the file has none of its own (tied embeddings). Engines build the model first and
    quantize each ``Linear`` a scheme targets unless it is ignored; a tied lm_head must not be."""
    kept = [_module(tp.name) for tp in plans if not tp.quantized and _is_linear_weight(tp)]
    if not any(_module(tp.name) == "lm_head" for tp in plans):
        kept.append("lm_head")
    return kept


def _what(tp: TensorPlan) -> str:
    if not tp.quantized:
        return f"kept {tp.format}"
    g = tp.group_size
    return tp.format + ("" if g is None else " per tensor" if g == PER_TENSOR else f" g{g}")


def _is_linear_weight(tp: TensorPlan) -> bool:
    from llmctl.tensors import tensor_role

    return len(tp.shape) == 2 and tensor_role(tp.name, tp.shape) in ("linear", "lm_head")


def _ct_scheme(tp: TensorPlan) -> dict[str, Any]:
    _rows, cols = tp.rows_cols
    fmt = REGISTRY[tp.format]
    if fmt.family == "fp8":
        g = tp.group_size
        strategy = "tensor" if g == PER_TENSOR else "channel" if g is None else "group"
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy,
                "group_size": g if strategy == "group" else None, "dynamic": False, "observer": "minmax",
                "format": "float-quantized"}  # fmt: skip
    g = tp.group_size
    channel = g == cols
    return {"num_bits": int(fmt.bits), "type": "int", "symmetric": not fmt.zero_bits,
            "strategy": "channel" if channel else "group", "group_size": None if channel else g,
            "dynamic": False, "observer": "minmax", "format": "pack-quantized"}  # fmt: skip


# ---- bitsandbytes ----------------------------------------------------------------------------------
BNB_STATE_BYTES = 256  # the packed quant-state JSON, padded with spaces (its offset is known only at the end)


class BnB(Layout):
    """bitsandbytes 4-bit (``Linear4bit`` state dict, as transformers saves it): ``NAME`` uint8 (n/2, 1)
    codes, high nibble first; ``NAME.absmax`` fp32 (blocks,) — uint8 with double quantization, plus
    ``NAME.nested_absmax`` fp32 and ``NAME.nested_quant_map`` fp32 (256,); ``NAME.quant_map`` fp32 (16,);
    ``NAME.quant_state.bitsandbytes__nf4`` uint8: JSON {quant_type, blocksize, dtype, shape[,
    nested_blocksize, nested_dtype, nested_offset]}."""

    name = "bnb"
    formats = ("nf4", "nf4-dq")
    description = "bitsandbytes 4-bit serialization (transformers, vLLM)"

    def _outputs(self, tp: TensorPlan) -> Out:
        from llmctl.quant.safetensors_io import st_dtype

        specs = _specs(tp)
        names = {"weight": tp.name, "absmax": f"{tp.name}.absmax", "quant_map": f"{tp.name}.quant_map",
                 "nested_absmax": f"{tp.name}.nested_absmax", "nested_quant_map": f"{tp.name}.nested_quant_map"}  # fmt: skip
        out = [(names[k], st_dtype(dt), shape) for k, (dt, shape) in specs.items() if k in names]
        out.append((f"{tp.name}.quant_state.bitsandbytes__nf4", "U8", (BNB_STATE_BYTES,)))
        return out

    def _write(self, tp: TensorPlan, chunk: QTensor, first: bool) -> list[tuple[str, Any]]:
        out = []
        state = {
            "quant_type": "nf4",
            "blocksize": chunk.group_size,
            "dtype": tp.dtype,
            "shape": list(tp.shape),
        }
        for part, t in chunk.parts.items():
            if part == "weight":
                out.append((tp.name, t))
            elif part == "offset":  # the last chunk of nf4-dq: the state gets the nested offset
                state.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(t))
                out.append(_bnb_state(tp, state))
            else:
                out.append((f"{tp.name}.{part}", t))
        if first and not REGISTRY[tp.format].double_quant:  # nf4-dq: with its last chunk (the offset)
            out.append(_bnb_state(tp, state))
        return out

    def config(self, plans: list[TensorPlan]) -> dict[str, Any]:
        q = [tp for tp in plans if tp.quantized]
        dq = any(REGISTRY[tp.format].double_quant for tp in q)
        skip = sorted({m.rsplit(".", 1)[-1] for m in _linear_kept(plans)})
        dtype = q[0].dtype if q else "bfloat16"
        return {
            "quantization_config": {
                "quant_method": "bitsandbytes",
                "load_in_4bit": True,
                "load_in_8bit": False,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": dq,
                "bnb_4bit_compute_dtype": dtype,
                "bnb_4bit_quant_storage": "uint8",
                "llm_int8_skip_modules": skip or None,
                "llm_int8_threshold": 6.0,
                "llm_int8_has_fp16_weight": False,
                "llm_int8_enable_fp32_cpu_offload": False,
            }
        }


def _bnb_state(tp: TensorPlan, state: dict[str, Any]) -> tuple[str, Any]:
    import torch

    raw = json.dumps(state).encode()
    if len(raw) > BNB_STATE_BYTES:
        raise QuantError(f"internal error: bitsandbytes quant state of {tp.name} is {len(raw)} bytes")
    raw += b" " * (BNB_STATE_BYTES - len(raw))  # json.loads ignores trailing spaces
    return f"{tp.name}.quant_state.bitsandbytes__nf4", torch.frombuffer(bytearray(raw), dtype=torch.uint8)


# ---- llmctl -----------------------------------------------------------------------------------------
class Llmctl(Layout):
    """Every registry format, its parts stored as they are: ``NAME`` the ``weight`` part, ``NAME.<part>``
    the others (scale, zero_point, absmax, ...); config.json ``quantization`` = {"layout": "llmctl",
    "version": 1, "tensors": {NAME: {"format", "group_size", options}}}."""

    name = "llmctl"
    formats = tuple(n for n, f in REGISTRY.items() if f.can_quantize and not f.is_float)  # every one
    description = "llmctl's own: registry parts as they are, formats named in config.json"

    def _outputs(self, tp: TensorPlan) -> Out:
        from llmctl.quant.safetensors_io import st_dtype

        return [(_part_name(tp.name, k), st_dtype(dt), shape) for k, (dt, shape) in _specs(tp).items()]

    def _write(self, tp: TensorPlan, chunk: QTensor, first: bool) -> list[tuple[str, Any]]:
        return [(_part_name(tp.name, k), t) for k, t in chunk.parts.items()]

    def config(self, plans: list[TensorPlan]) -> dict[str, Any]:
        tensors = {
            tp.name: {"format": tp.format, "shape": list(tp.shape), "group_size": tp.group_size, **tp.opts}
            for tp in plans
            if tp.quantized
        }
        return {"quantization": {"layout": "llmctl", "version": 1, "tensors": tensors}}


def _part_name(name: str, part: str) -> str:
    return name if part == "weight" else f"{name}.{part}"


LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (HF(), CompressedTensors(), BnB(), Llmctl())}


def choose_layout(requested: str, plans: list[TensorPlan]) -> tuple[Layout, str | None]:
    """``auto``: the ecosystem layout that holds every planned tensor (hf, compressed-tensors, bnb), else
    llmctl's. A named layout that cannot hold a tensor, or the combination, is refused, naming the tensor
    and the layouts that hold the whole plan. Returns the layout and, when ``auto`` passed over an
    ecosystem layout that holds every tensor but not their combination, why."""
    if requested != "auto":
        if requested not in LAYOUTS:
            raise QuantError(f"unknown layout {requested!r}; choose auto, {', '.join(LAYOUTS)}")
        lay = LAYOUTS[requested]
        fits = [n for n, other in LAYOUTS.items() if _holds(other, plans)]
        bad = [tp for tp in plans if not lay.accepts(tp)]
        if bad:
            tp = bad[0]
            what = f"{tp.format}" + (f" {tp.opts['fp8']}" if "fp8" in tp.opts else "")
            why = f", {tp.reason}" if tp.reason.startswith(("recipe", "--override")) else ""
            raise QuantError(
                f"layout {requested} cannot hold {what} ({tp.name}{why}); use --layout {' or '.join(fits)} "
                "(or auto)"
            )
        if problem := lay.problem(plans):
            raise QuantError(
                f"layout {requested} cannot hold this mix: {problem}; give the whole group one format (one "
                "--override or --keep pattern for all of it) or use --layout llmctl"
            )
        return lay, None
    passed_over = None
    for name in ("hf", "compressed-tensors", "bnb"):
        lay = LAYOUTS[name]
        if all(lay.accepts(tp) for tp in plans):
            if (problem := lay.problem(plans)) is None:
                return lay, None
            passed_over = f"written in llmctl's layout, not {name}: {problem}"
    return LAYOUTS["llmctl"], passed_over


def _holds(lay: Layout, plans: list[TensorPlan]) -> bool:
    return all(lay.accepts(tp) for tp in plans) and lay.problem(plans) is None


# ---- reading back (llmctl's runtime) ----------------------------------------------------------------
Fetch = Callable[[str], Any]  # entry name -> tensor (KeyError when absent)


def detect(config: dict[str, Any]) -> str | None:
    """The layout a config.json describes (None: plain float checkpoint)."""
    q = config.get("quantization")
    if isinstance(q, dict) and q.get("layout") == "llmctl":
        return "llmctl"
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        method = qc.get("quant_method")
        if method == "compressed-tensors":
            return "compressed-tensors"
        if method == "bitsandbytes" and qc.get("load_in_4bit"):
            return "bnb"
        raise FormatError(
            f"quantization_config with quant_method {method!r} is not a layout llmctl's runtime loads; "
            "it loads compressed-tensors (int4/int8 pack-quantized, fp8 float-quantized), bitsandbytes 4-bit "
            "and llmctl's own layout"
        )
    return None


def read_quantized(layout: str, config: dict[str, Any], names: set[str], fetch: Fetch) -> dict[str, QTensor]:
    """{weight name: QTensor} for every quantized tensor among ``names`` (the entries of the checkpoint)."""
    if layout == "llmctl":
        return _read_llmctl(config["quantization"], fetch)
    if layout == "bnb":
        return _read_bnb(names, fetch)
    return _read_ct(config["quantization_config"], names, fetch)


def _read_llmctl(q: dict[str, Any], fetch: Fetch) -> dict[str, QTensor]:
    out = {}
    for name, spec in q.get("tensors", {}).items():
        fmt, shape, g = spec["format"], tuple(spec["shape"]), spec.get("group_size")
        opts = {k: v for k, v in spec.items() if k not in ("format", "shape", "group_size")}
        specs = REGISTRY[fmt].part_specs(shape, g, **opts)
        parts = {part: fetch(_part_name(name, part)) for part in specs}
        if REGISTRY[fmt].grouped:
            g = REGISTRY[fmt].check_group(shape[-1], g)
        out[name] = QTensor(fmt, shape, g, parts, opts)
    return out


def _read_bnb(names: set[str], fetch: Fetch) -> dict[str, QTensor]:
    out = {}
    for key in [n for n in names if n.endswith(".quant_state.bitsandbytes__nf4")]:
        name = key.removesuffix(".quant_state.bitsandbytes__nf4")
        state = json.loads(bytes(fetch(key).tolist()).decode())
        if state.get("quant_type") != "nf4":
            raise FormatError(
                f"{name}: bitsandbytes {state.get('quant_type')} weights are not supported; use nf4"
            )
        parts = {"weight": fetch(name), "absmax": fetch(f"{name}.absmax")}
        fmt = find_format(family="nf4", double_quant="nested_offset" in state)
        if "nested_offset" in state:
            parts["nested_absmax"] = fetch(f"{name}.nested_absmax")
            parts["nested_quant_map"] = fetch(f"{name}.nested_quant_map")
            import torch

            parts["offset"] = torch.tensor([state["nested_offset"]], dtype=torch.float32)
        parts["quant_map"] = fetch(f"{name}.quant_map")
        out[name] = QTensor(
            fmt, tuple(state["shape"]), int(state["blocksize"]), parts, {"dtype": state.get("dtype")}
        )
    return out


def _read_ct(qc: dict[str, Any], names: set[str], fetch: Fetch) -> dict[str, QTensor]:
    import torch

    from llmctl.quant.primitives import pack_nibbles, unpack_nibbles, words_bytes

    schemes = []
    for group in qc.get("config_groups", {}).values():
        schemes.append(
            (group.get("targets", []), group.get("weights") or {}, group.get("format") or qc.get("format"))
        )

    def scheme_for(module: str) -> tuple[dict[str, Any], str]:
        for targets, w, fmt in schemes:
            if "Linear" in targets or module in targets:
                return w, fmt
        raise FormatError(f"compressed-tensors: no config group targets {module}")

    out = {}
    for key in sorted(n for n in names if n.endswith((".weight_packed", ".weight_scale"))):
        module = key.rsplit(".", 1)[0]
        name = f"{module}.weight"
        if name in out:
            continue
        w, fmt = scheme_for(module)
        if fmt == "float-quantized" or w.get("type") == "float":
            weight, scale = fetch(f"{module}.weight"), fetch(f"{module}.weight_scale").float()
            strategy = w.get("strategy")
            g = PER_TENSOR if strategy == "tensor" else w.get("group_size") if strategy == "group" else None
            if weight.dtype != torch.float8_e4m3fn:
                raise FormatError(
                    f"{name}: compressed-tensors float weights must be F8_E4M3, found {weight.dtype}"
                )
            scale = scale.reshape(1, 1) if g == PER_TENSOR else scale.reshape(weight.shape[0], -1)
            out[name] = QTensor(
                find_format(family="fp8"), tuple(weight.shape), g, {"weight": weight, "scale": scale}, {"fp8": "e4m3"}
            )
            continue
        if fmt != "pack-quantized":
            raise FormatError(
                f"{name}: compressed-tensors format {fmt!r} is not supported; llmctl reads pack-quantized and float-quantized"
            )
        bits = int(w.get("num_bits", 4))
        if bits not in (4, 8):
            raise FormatError(f"{name}: {bits}-bit weights are not supported; llmctl reads 4- and 8-bit")
        rows, cols = (int(x) for x in fetch(f"{module}.weight_shape").tolist())
        packed = fetch(f"{module}.weight_packed")
        scale = fetch(f"{module}.weight_scale").to(torch.float16)
        g = cols if w.get("strategy") == "channel" else int(w["group_size"])
        raw = words_bytes(packed, math.ceil(cols * bits / 8))  # (rows, bytes)
        if bits == 8:
            parts = {"weight": (raw.to(torch.int16) - 128).to(torch.int8), "scale": scale.reshape(rows, -1)}
        else:
            parts = {"weight": raw, "scale": scale.reshape(rows, -1)}
        zero_bits = 0
        if not w.get("symmetric", True):
            if bits != 4:
                raise FormatError(f"{name}: asymmetric 8-bit weights are not supported")
            ng = cols // g
            zp = fetch(f"{module}.weight_zero_point")  # (ceil(rows/8), groups) int32 packed along rows
            zb = words_bytes(zp.t().contiguous(), math.ceil(rows / 2))  # (groups, rows/2)
            zcodes = unpack_nibbles(zb, rows).t().reshape(-1)  # (rows * groups,)
            parts["zero_point"] = pack_nibbles(zcodes.contiguous())
            del ng
            zero_bits = bits
        out[name] = QTensor(find_format(family="int", bits=bits, zero_bits=zero_bits), (rows, cols), g, parts)
    return out
