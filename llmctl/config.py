"""ModelConfig: one dataclass with Hugging Face field names, from config.json or GGUF metadata.

Importable without torch. Unknown keys are ignored; the config is validated once, after construction.
Families: llama, mistral, qwen2, qwen3, gemma3 (text), mixtral, deepseek_v3, phi3. Memory estimation
covers all of them; the torch runtime runs the dense Llama-family subset (see ``RUNTIME_FAMILIES``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import ConfigError, UnsupportedArchitectureError

# model_type -> the architectures name transformers uses for the causal LM.
FAMILIES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
# Aliases seen in config.json files and GGUF general.architecture values.
_ALIASES = {"gemma3": "gemma3_text", "smollm2": "llama", "smollm": "llama", "deepseek3": "deepseek_v3"}
# Families whose transformers config ties the embeddings unless config.json says otherwise (Gemma 3's
# config.json files omit tie_word_embeddings and rely on that default).
_TIED_BY_DEFAULT = ("gemma3_text",)
# Families the torch runtime runs (MoE and MLA are estimated only).
RUNTIME_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

# Layer kinds, as transformers' `layer_types` names them.
FULL = "full_attention"
SLIDING = "sliding_attention"


def supported_families() -> str:
    return ", ".join(sorted(FAMILIES))


def read_config_json(path: str | Path) -> Any:
    """A config.json's JSON value (the one reader of config.json files); ConfigError, one line, when it is
    missing, unreadable or malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; pass a folder with config.json or a config.json path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e.__class__.__name__}: {e}); check the file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:  # brackets nested thousands deep
        raise ConfigError(f"{path}: JSON nested too deeply for a model config; fix config.json") from None


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    torch_dtype: str | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    # Sliding-window attention: window size and which layers use it.
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    sliding_window_pattern: int | None = None
    max_window_layers: int | None = None
    use_sliding_window: bool | None = None
    # Gemma 3
    rope_local_base_freq: float | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    # Mixture of experts (Mixtral: num_local_experts; DeepSeek: n_routed_experts/n_shared_experts)
    num_local_experts: int | None = None
    num_experts_per_tok: int | None = None
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int | None = None
    topk_group: int | None = None
    # Multi-head latent attention (DeepSeek V2/V3)
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    # Where the config came from (not a Hugging Face field).
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _check_types(self)
        self.model_type = _ALIASES.get(self.model_type, self.model_type)
        if self.model_type not in FAMILIES:
            raise UnsupportedArchitectureError(
                f"{self._where()}model_type {self.model_type!r} is not supported; "
                f"supported families: {supported_families()}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            _positive_int(self, name)
        if not self.rms_norm_eps > 0:  # 0 divides by zero, < 0 takes the root of a negative: NaN logits
            raise ConfigError(
                f"{self._where()}rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}; "
                "fix config.json"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _positive_int(self, "num_key_value_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{self._where()}num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}); fix config.json"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"{self._where()}hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}) and no head_dim is given; add head_dim to config.json"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        _positive_int(self, "head_dim")
        if self.sliding_window is not None:
            _positive_int(self, "sliding_window")
        if self.layer_types is not None:
            bad = [t for t in self.layer_types if t not in (FULL, SLIDING)]
            if len(self.layer_types) != self.num_hidden_layers or bad:
                raise ConfigError(
                    f"{self._where()}layer_types must list {self.num_hidden_layers} entries of "
                    f"'{FULL}' or '{SLIDING}'; fix config.json"
                )
        if self.is_mla:
            for name in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
                _positive_int(self, name)
        if self.model_type == "gemma3_text" and self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = self.head_dim
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, Mapping):
            raise ConfigError(f"{self._where()}rope_scaling must be an object or null; fix config.json")

    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""

    # ---- derived properties -------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def num_experts(self) -> int:
        return self.num_local_experts or self.n_routed_experts or 0

    @property
    def qk_norm(self) -> bool:
        return self.model_type in ("qwen3", "gemma3_text")

    # What each family's layers look like, as transformers builds them: the runtime's model
    # (runtime/model.py), the tensor list (tensors.py) and the GGUF names read these, never model_type.
    @property
    def qkv_bias(self) -> bool:
        """Whether q/k/v projections have biases: always in Qwen2 (transformers hard-codes it), never in
        Mistral, Mixtral and Phi-3; elsewhere ``attention_bias`` switches them."""
        if self.model_type == "qwen2":
            return True
        if self.model_type in ("mistral", "mixtral", "phi3"):
            return False
        return self.attention_bias

    @property
    def o_proj_bias(self) -> bool:
        """Whether the attention output projection has a bias: ``attention_bias``, except in Qwen2, Mistral,
        Mixtral and Phi-3, which have none."""
        if self.model_type in ("qwen2", "mistral", "mixtral", "phi3"):
            return False
        return self.attention_bias

    @property
    def mlp_proj_bias(self) -> bool:
        """Whether the dense MLP's projections have biases: ``mlp_bias``, which only Llama has."""
        return self.mlp_bias and self.model_type == "llama"

    @property
    def fused_qkv(self) -> bool:
        """Whether the checkpoint stores q/k/v as one ``qkv_proj`` (Phi-3)."""
        return self.model_type == "phi3"

    @property
    def fused_gate_up(self) -> bool:
        """Whether the checkpoint stores the MLP's gate and up projections as one ``gate_up_proj`` (Phi-3)."""
        return self.model_type == "phi3"

    @property
    def norm_offset(self) -> bool:
        """Whether RMSNorm scales by ``1 + weight`` (weights stored around 0, Gemma 3) rather than by ``weight``."""
        return self.model_type == "gemma3_text"

    @property
    def sandwich_norms(self) -> bool:
        """Whether each layer norms the attention and MLP outputs too (``pre_feedforward_layernorm``,
        ``post_feedforward_layernorm``, ``post_attention_layernorm`` on the attention output: Gemma 3)."""
        return self.model_type == "gemma3_text"

    @property
    def embed_scale(self) -> bool:
        """Whether the token embeddings are multiplied by sqrt(hidden_size) (Gemma 3)."""
        return self.model_type == "gemma3_text"

    @property
    def moe_layout(self) -> str | None:
        """How mixture-of-experts layers are laid out: "block_sparse_moe" (Mixtral: a router and experts of
        w1/w2/w3 under ``block_sparse_moe.``, every layer), "routed_shared" (DeepSeek V3: a router with a
        score-correction bias, routed and shared experts under ``mlp.``, in the layers ``layer_is_moe``
        names), or None (dense)."""
        if self.model_type == "mixtral":
            return "block_sparse_moe"
        if self.model_type == "deepseek_v3":
            return "routed_shared"
        return None

    def layer_is_moe(self, i: int) -> bool:
        if self.num_local_experts:
            return True
        if self.n_routed_experts:
            return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0
        return False

    def layer_kinds(self) -> list[str]:
        """Per layer: FULL or SLIDING attention, following each family's rules."""
        n = self.num_hidden_layers
        if self.layer_types is not None:
            return list(self.layer_types)
        if self.sliding_window is None:
            return [FULL] * n
        if self.model_type == "gemma3_text":
            pattern = self.sliding_window_pattern or 6
            return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
        if self.model_type in ("qwen2", "qwen3"):
            if not self.use_sliding_window:
                return [FULL] * n
            # transformers: layers at index >= max_window_layers use sliding attention.
            mwl = self.max_window_layers if self.max_window_layers is not None else n
            return [SLIDING if i >= mwl else FULL for i in range(n)]
        if self.model_type in ("mistral", "mixtral", "phi3"):
            return [SLIDING] * n
        return [FULL] * n

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "") -> ModelConfig:
        if not isinstance(d, Mapping):
            raise ConfigError(
                f"{source or 'config'}: expected a JSON object at the top level; fix config.json"
            )
        d = dict(d)
        if "text_config" in d and isinstance(d["text_config"], Mapping):  # multimodal wrapper (Gemma 3)
            d = {**d["text_config"], "model_type": d["text_config"].get("model_type", d.get("model_type"))}
        if "model_type" not in d:
            raise ConfigError(
                f"{source or 'config'}: no model_type; a Hugging Face config.json names its model_type "
                f"(one of {supported_families()})"
            )
        if not isinstance(d["model_type"], str):
            raise ConfigError(
                f"{source or 'config'}: model_type must be a string (one of {supported_families()}), "
                f"got {d['model_type']!r:.40}; fix config.json"
            )
        if d.get("hidden_act") is None and d.get("hidden_activation") is not None:
            d["hidden_act"] = d["hidden_activation"]  # Gemma 3 names its activation hidden_activation
        if d.get("rope_scaling") is None and isinstance(d.get("rope_parameters"), Mapping):
            # transformers >= 5 stores RoPE settings under rope_parameters.
            rp = dict(d["rope_parameters"])
            if "full_attention" in rp and isinstance(rp["full_attention"], Mapping):
                local = rp.get("sliding_attention") or {}
                if "rope_theta" in local and d.get("rope_local_base_freq") is None:
                    d["rope_local_base_freq"] = local["rope_theta"]
                rp = dict(rp["full_attention"])
            if "rope_theta" in rp and "rope_theta" not in d:
                d["rope_theta"] = rp["rope_theta"]
            if rp.get("rope_type", "default") != "default":
                d["rope_scaling"] = rp
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        family = _ALIASES.get(d["model_type"], d["model_type"])
        if "tie_word_embeddings" not in kwargs and family in _TIED_BY_DEFAULT:
            kwargs["tie_word_embeddings"] = True
        if "torch_dtype" not in kwargs and isinstance(d.get("dtype"), str):
            kwargs["torch_dtype"] = d["dtype"]
        kwargs["source"] = source
        try:
            return cls(**kwargs)
        except TypeError as e:  # missing required fields
            missing = [
                f.name
                for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
                and f.name not in kwargs
            ]
            raise ConfigError(
                f"{source or 'config'}: missing required field(s) {', '.join(missing) or str(e)}; "
                "a Hugging Face config.json must define them"
            ) from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        d = read_config_json(path)
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_gguf_metadata(
        cls, meta: Mapping[str, Any], source: str = "", tensor_names: Iterable[str] | None = None
    ) -> ModelConfig:
        """Build from GGUF key/value metadata (already decoded to Python values).

        GGUF metadata does not say whether the embeddings are tied; the tensor table does (a tied model
        has no ``output.weight``). Pass ``tensor_names`` to set ``tie_word_embeddings`` from it.
        """
        arch = meta.get("general.architecture")
        if not isinstance(arch, str):
            raise ConfigError(f"{source}: GGUF has no general.architecture; the file is not a model GGUF")
        model_type = _ALIASES.get(arch, arch)
        if model_type not in FAMILIES:
            raise UnsupportedArchitectureError(
                f"{source}: GGUF architecture {arch!r} is not supported; supported families: {supported_families()}"
            )

        def g(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        n_head = g("attention.head_count")
        n_kv = g("attention.head_count_kv", n_head)
        n_layer = g("block_count")
        if isinstance(n_head, list):
            n_head = max(n_head)
        if isinstance(n_kv, list):  # per-layer head counts: take the largest (estimate upper bound)
            n_kv = max(n_kv)
        vocab = g("vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else None
        d: dict[str, Any] = {
            "model_type": model_type,
            "vocab_size": vocab,
            "hidden_size": g("embedding_length"),
            "intermediate_size": g("feed_forward_length"),
            "num_hidden_layers": n_layer,
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": g("attention.key_length"),
            "max_position_embeddings": g("context_length", 4096),
            "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": g("rope.freq_base", 10000.0),
            "sliding_window": g("attention.sliding_window"),
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        }
        if tensor_names is not None:
            d["tie_word_embeddings"] = "output.weight" not in set(tensor_names)
        if isinstance(d["intermediate_size"], list):
            d["intermediate_size"] = max(d["intermediate_size"])
        scaling = g("rope.scaling.type")
        if scaling and scaling != "none":
            d["rope_scaling"] = {"rope_type": scaling, "factor": g("rope.scaling.factor", 1.0)}
            if g("rope.scaling.original_context_length") is not None:
                d["rope_scaling"]["original_max_position_embeddings"] = g(
                    "rope.scaling.original_context_length"
                )
        if model_type == "gemma3_text":
            d["hidden_act"] = "gelu_pytorch_tanh"
            d["rope_local_base_freq"] = 10000.0
            pattern = g("attention.sliding_window_pattern", 6)
            if isinstance(pattern, list):  # one flag per layer, true = sliding (llama.cpp's load_swa_pattern)
                d["layer_types"] = [SLIDING if swa else FULL for swa in pattern]
            else:
                d["sliding_window_pattern"] = pattern
            d["query_pre_attn_scalar"] = int(d["head_dim"] or (d["hidden_size"] // n_head))
        if model_type in ("qwen2",):
            d["attention_bias"] = True
        if model_type in ("mistral",) and d["sliding_window"] is None:
            d.pop("sliding_window")
        if g("expert_count"):
            if model_type == "deepseek_v3":
                d["n_routed_experts"] = g("expert_count")
                d["n_shared_experts"] = g("expert_shared_count", 1)
                d["moe_intermediate_size"] = g("expert_feed_forward_length")
                d["first_k_dense_replace"] = g("leading_dense_block_count", 0)
            else:
                d["num_local_experts"] = g("expert_count")
            d["num_experts_per_tok"] = g("expert_used_count")
        if g("attention.kv_lora_rank"):
            d["kv_lora_rank"] = g("attention.kv_lora_rank")
            d["q_lora_rank"] = g("attention.q_lora_rank")
            d["qk_rope_head_dim"] = g("rope.dimension_count")
            d["qk_nope_head_dim"] = (g("attention.key_length") or 0) - (g("rope.dimension_count") or 0)
            d["v_head_dim"] = g("attention.value_length")
            d["head_dim"] = g("rope.dimension_count")
        missing = [
            k
            for k, v in d.items()
            if v is None and k not in ("head_dim", "sliding_window", "bos_token_id", "eos_token_id")
        ]
        if missing:
            raise ConfigError(
                f"{source}: GGUF metadata lacks {', '.join(missing)} for architecture {arch!r}; the file is incomplete"
            )
        return cls.from_dict({k: v for k, v in d.items() if v is not None}, source=source)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        d["architectures"] = [self.architecture]
        return {k: v for k, v in d.items() if v is not None}

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers' config class of the family writes it: only the keys that class
        declares (``HF_KEYS``), RoPE under ``rope_parameters``, integral values as integers. Families the
        runtime does not run fall back to every non-default field."""
        keys = HF_KEYS.get(self.model_type)
        if keys is None:
            return self.to_dict()
        d: dict[str, Any] = {"architectures": [self.architecture], "model_type": self.model_type}
        for key in (*_HF_COMMON_KEYS, *keys):
            value = getattr(self, _HF_RENAMED.get(key, key))
            if key == "layer_types" and self.model_type == "gemma3_text":
                value = self.layer_kinds()  # the class keeps no sliding_window_pattern
            if value is not None:
                d[key] = int(value) if key in _HF_INT_KEYS and float(value).is_integer() else value
        d["rope_parameters"] = self._rope_parameters()
        if self.torch_dtype:
            d["dtype"] = str(self.torch_dtype).removeprefix("torch.")
        return d

    def _rope_parameters(self) -> dict[str, Any]:
        """transformers >= 5's ``rope_parameters``: rope_type, rope_theta and the scaling fields (per layer
        kind for Gemma 3, whose local layers have their own base and no scaling)."""
        main = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": float(self.rope_theta)}
        if "type" in main:  # older configs name the rule "type"
            main["rope_type"] = main.pop("type")
        if self.partial_rotary_factor != 1.0:
            main["partial_rotary_factor"] = self.partial_rotary_factor
        if self.model_type != "gemma3_text":
            return main
        local = float(self.rope_local_base_freq if self.rope_local_base_freq is not None else 10000.0)
        return {"full_attention": main, "sliding_attention": {"rope_type": "default", "rope_theta": local}}


# config.json keys per family, as transformers' config class for it declares them (transformers 5.x;
# tests/test_interop.py checks each against the installed transformers): every family writes the common
# keys, then its own. RoPE goes under ``rope_parameters`` (ModelConfig._rope_parameters).
_HF_COMMON_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
    "eos_token_id",
)  # fmt: skip
HF_KEYS: dict[str, tuple[str, ...]] = {
    "llama": ("head_dim", "hidden_act", "attention_bias", "mlp_bias"),
    "mistral": ("head_dim", "hidden_act", "sliding_window"),
    # Qwen2's q/k/v bias is not a config key: the architecture always has it
    "qwen2": ("hidden_act", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
    "qwen3": ("head_dim", "hidden_act", "attention_bias", "use_sliding_window", "sliding_window",
              "max_window_layers", "layer_types"),
    "gemma3_text": ("head_dim", "hidden_activation", "attention_bias", "query_pre_attn_scalar", "sliding_window",
                    "layer_types", "final_logit_softcapping", "attn_logit_softcapping"),
}  # fmt: skip
_HF_RENAMED = {"hidden_activation": "hidden_act"}  # config.json key -> ModelConfig field
_HF_INT_KEYS = ("query_pre_attn_scalar",)  # int in transformers' class, read as a number here

# Sizes beyond these are corrupt or hostile configs, not models: they would only make llmctl loop or
# allocate without end (2**31 tokens of context, 100k layers are far past any published model).
_MAX_INT = 2**31
_MAX_LAYERS = 100_000


def _positive_int(cfg: ModelConfig, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{cfg._where()}{name} must be a positive integer, got {v!r}; fix config.json")
    limit = _MAX_LAYERS if name == "num_hidden_layers" else _MAX_INT
    if v > limit:
        raise ConfigError(f"{cfg._where()}{name} is {v}, above the sane limit {limit}; fix config.json")


def _type_ok(value: Any, annotation: str) -> bool:
    """Whether a JSON value matches a field annotation such as ``int | list[int] | None``."""
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None" and value is None:
            return True
        if isinstance(value, bool):
            if part == "bool":
                return True
            continue
        if part == "int" and isinstance(value, int) and abs(value) <= 2**63:
            return True
        if part == "float" and isinstance(value, (int, float)) and math.isfinite(value):
            return True
        if part == "str" and isinstance(value, str):
            return True
        if part.startswith("dict") and isinstance(value, Mapping):
            return True
        if part.startswith("list[") and isinstance(value, list):
            item = part[5:-1]
            if len(value) <= _MAX_LAYERS and all(_type_ok(v, item) for v in value):
                return True
    return False


def _check_types(cfg: ModelConfig) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name != "source" and not _type_ok(value, str(f.type)):
            shown = repr(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise ConfigError(
                f"{cfg._where()}{f.name} must be of type {f.type}, got {shown}; fix config.json"
            )
