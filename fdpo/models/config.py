"""Model configuration, read from (and written back to) a Hugging Face `config.json`.

Two architectures are supported, and they differ in very little:

| field                | Qwen2 (Qwen2.5-Coder)     | Llama (DeepSeek-Coder)          |
|----------------------|---------------------------|---------------------------------|
| q/k/v projection bias| always                    | only with `attention_bias`      |
| o projection bias    | never                     | only with `attention_bias`      |
| tied embeddings      | small sizes (0.5B-3B)     | `tie_word_embeddings`, usually off |
| rope                 | theta 1e6, no scaling     | theta 1e5, linear scaling x4    |

Every such value is read from the checkpoint, never typed in code. Checkpoints written by
transformers 4.x keep `rope_theta` and `rope_scaling` at the top level; transformers 5.x
writes a `rope_parameters` dict. Both are read.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import types
import typing
from typing import Any, Mapping

ARCHITECTURES = ("qwen2", "llama")
ROPE_TYPES = ("default", "linear")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")
# Attention of the forward without a KV cache (training, reference, scoring): "einsum" (the
# explicit score/softmax/value products), or `jax.nn.dot_product_attention` with XLA's
# implementation ("dot_product") or cuDNN's fused kernel ("cudnn", GPU only, bf16/fp16).
ATTENTION_IMPLS = ("einsum", "dot_product", "cudnn")


class ConfigError(ValueError):
    """A checkpoint's config.json asks for something fdpo does not support or is malformed."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    The first block of fields comes from the checkpoint. The last block (dtypes, remat,
    scan) is how fdpo runs it and is not part of the Hugging Face config.
    """

    architecture: str  # "qwen2" or "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str = "default"  # "default" or "linear"
    rope_factor: float = 1.0  # positions are divided by this under linear scaling
    qkv_bias: bool = False
    o_bias: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # The dtype the checkpoint's tensors are stored in (export writes them back in it).
    checkpoint_dtype: str = "float32"

    # How fdpo runs the model.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat_policy: str = "none"  # "none", "full" (recompute the whole block), "dots"
    scan_layers: bool = True  # jax.lax.scan over the stacked layers, or a Python loop
    attention: str = "einsum"  # ATTENTION_IMPLS; the sampler's cached path is always einsum
    # "dot_product" only: > 0 runs the queries in blocks of this many under jax.checkpoint,
    # so forward and backward hold [block, length] scores per head instead of [length]^2.
    attention_block: int = 0

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture={self.architecture!r}; expected one of {ARCHITECTURES}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_type={self.rope_type!r}; fdpo supports {ROPE_TYPES}")
        for name in ("param_dtype", "compute_dtype", "checkpoint_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name}={getattr(self, name)!r}; expected one of {DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention={self.attention!r}; expected one of {ATTENTION_IMPLS}")
        if self.attention_block < 0 or (self.attention_block and
                                        self.attention != "dot_product"):
            raise ConfigError(f"attention_block={self.attention_block} with attention="
                              f"{self.attention!r}; blocks are for attention='dot_product', "
                              f"0 disables them")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                    f"num_attention_heads={self.num_heads} is not a multiple of "
                    f"num_key_value_heads={self.num_kv_heads}")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attn += d
        layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + d

    # --------------------------------------------------------------------------------------
    # Hugging Face config.json
    # --------------------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json",
                                          **overrides) -> ModelConfig:
        """Builds a config from a parsed HF `config.json`; `source` names it in errors."""

        def need(key):
            if key not in hf:
                raise ConfigError(f"{source}: required field {key!r} is missing")
            return hf[key]

        model_type = need("model_type")
        if model_type not in ARCHITECTURES:
            raise ConfigError(
                    f"{source}: model_type={model_type!r} is not supported; fdpo ports {ARCHITECTURES}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
        if hf.get("mlp_bias", False):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        if hf.get("use_sliding_window", False):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported")

        rope_theta, rope_type, rope_factor = _read_rope(hf, source)
        num_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = hf.get("head_dim") or hidden // num_heads
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        if dtype not in DTYPES:
            raise ConfigError(f"{source}: dtype={dtype!r}; expected one of {DTYPES}")
        fields = dict(
                architecture=model_type,
                vocab_size=need("vocab_size"),
                hidden_size=hidden,
                intermediate_size=need("intermediate_size"),
                num_layers=need("num_hidden_layers"),
                num_heads=num_heads,
                num_kv_heads=hf.get("num_key_value_heads") or num_heads,
                head_dim=head_dim,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_type=rope_type,
                rope_factor=rope_factor,
                qkv_bias=qkv_bias,
                o_bias=o_bias,
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_position_embeddings=hf.get("max_position_embeddings", 32768),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
                checkpoint_dtype=dtype,
                param_dtype=dtype,
                compute_dtype="float32" if dtype == "float32" else "bfloat16",
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_dir(cls, hf_dir: str | pathlib.Path, **overrides) -> ModelConfig:
        path = pathlib.Path(hf_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json in the Hugging Face directory {hf_dir}")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_config(hf, source=str(path), **overrides)

    def to_hf_config(self) -> dict[str, Any]:
        """A `config.json` in transformers 5.x layout (which transformers 4.x also reads back
        through its rope_scaling compatibility path only for 5.x; export prefers the original
        file when the checkpoint kept one)."""
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "linear":
            rope["factor"] = self.rope_factor
        hf = {
                "architectures": ["Qwen2ForCausalLM" if self.architecture == "qwen2" else
                                                    "LlamaForCausalLM"],
                "model_type": self.architecture,
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
                "hidden_act": "silu",
                "rms_norm_eps": self.rms_norm_eps,
                "rope_parameters": rope,
                "tie_word_embeddings": self.tie_embeddings,
                "max_position_embeddings": self.max_position_embeddings,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id,
                "dtype": self.checkpoint_dtype,
        }
        if self.architecture == "llama":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = False
        return hf

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**d)


def field_overrides(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The set (not None) entries of `fields` as ModelConfig overrides (a run config's
    `fields` section, say), ints for float fields made floats. A name that is no field, or a
    value of the wrong type, is a ConfigError naming it."""
    hints = typing.get_type_hints(ModelConfig)
    out = {}
    for name, value in fields.items():
        if value is None:
            continue
        if name not in hints:
            raise ConfigError(f"{name!r} is not a ModelConfig field (fields: {sorted(hints)})")
        if not _accepts(hints[name], value):
            kind = getattr(hints[name], "__name__", hints[name])
            raise ConfigError(f"ModelConfig field {name}={value!r}: expected {kind}")
        out[name] = float(value) if hints[name] is float else value
    return out


def _accepts(hint, value) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    if typing.get_origin(hint) is list:
        return isinstance(value, (list, tuple)) and all(
            _accepts(typing.get_args(hint)[0], v) for v in value)
    return isinstance(value, hint)


def _read_rope(hf: dict[str, Any], source: str) -> tuple[float, str, float]:
    """Returns (theta, type, linear factor) from either config layout."""
    if hf.get("rope_parameters"):  # transformers 5.x
        params, where = hf["rope_parameters"], "rope_parameters"
        theta = params.get("rope_theta", hf.get("rope_theta"))
    else:  # transformers 4.x
        params, where = hf.get("rope_scaling") or {}, "rope_scaling"
        theta = hf.get("rope_theta")
    if theta is None:
        raise ConfigError(f"{source}: no rope_theta (looked in rope_parameters and at top level)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
                f"{source}: {where}.rope_type={rope_type!r} is not supported; fdpo supports "
                f"{ROPE_TYPES}")
    factor = 1.0
    if rope_type == "linear":
        if "factor" not in params:
            raise ConfigError(f"{source}: {where} has rope_type 'linear' but no 'factor'")
        factor = float(params["factor"])
    return float(theta), rope_type, factor


# ----------------------------------------------------------------------------------------
# Shape-only presets, for benchmarks and dry runs. Real runs read the checkpoint's
# config.json; these numbers are the published configs of those checkpoints.
# ----------------------------------------------------------------------------------------

def _qwen25_coder(hidden, inter, layers, heads, kv_heads, tie):
    return ModelConfig(
            architecture="qwen2", vocab_size=151936 if tie else 152064, hidden_size=hidden,
            intermediate_size=inter, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
            head_dim=hidden // heads, rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
            tie_embeddings=tie, max_position_embeddings=32768, bos_token_id=151643,
            eos_token_id=151645, checkpoint_dtype="bfloat16", param_dtype="bfloat16",
            compute_dtype="bfloat16")


PRESETS = {
        "qwen2.5-coder-0.5b": lambda: _qwen25_coder(896, 4864, 24, 14, 2, tie=True),
        "qwen2.5-coder-1.5b": lambda: _qwen25_coder(1536, 8960, 28, 12, 2, tie=True),
        "qwen2.5-coder-7b": lambda: _qwen25_coder(3584, 18944, 28, 28, 4, tie=False),
        "deepseek-coder-6.7b": lambda: ModelConfig(
                architecture="llama", vocab_size=32256, hidden_size=4096, intermediate_size=11008,
                num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-6,
                rope_theta=1e5, rope_type="linear", rope_factor=4.0, max_position_embeddings=16384,
                bos_token_id=32013, eos_token_id=32021, checkpoint_dtype="bfloat16",
                param_dtype="bfloat16", compute_dtype="bfloat16"),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)
