"""Tiny random Hugging Face checkpoints built with transformers, for parity tests."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def make_hf_model(out_dir: pathlib.Path, arch: str, *, seed: int = 0, dtype=torch.float32,
                  max_shard_size: str | None = None, legacy_config: bool = False, **kw):
    """Builds, randomises and saves a tiny model; returns the torch model (eval mode).

    HF initialises biases to zero and norms to one; both are randomised so a dropped bias
    or a misplaced norm cannot hide. `legacy_config` rewrites config.json the way
    transformers 4.x wrote it (rope_theta and rope_scaling at the top level).
    """
    torch.manual_seed(seed)
    base = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rms_norm_eps=1e-6, initializer_range=0.25)
    base.update(kw)
    if arch == "qwen2":
        base.setdefault("rope_theta", 1e6)
        config, cls = Qwen2Config(**base), Qwen2ForCausalLM
    elif arch == "llama":
        base.setdefault("rope_theta", 1e5)
        config, cls = LlamaConfig(**base), LlamaForCausalLM
    else:
        raise ValueError(arch)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model = model.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    if legacy_config:
        path = out_dir / "config.json"
        cfg = json.loads(path.read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        rope_type = rope.pop("rope_type")
        cfg["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")
        cfg["transformers_version"] = "4.45.0"
        path.write_text(json.dumps(cfg, indent=2))
    return model


def torch_token_logprobs(model, ids: np.ndarray) -> np.ndarray:
    """[B, T] log p(x_t | x_<t) from transformers' own forward, lp[:, 0] = 0."""
    with torch.no_grad():
        logits = model(torch.as_tensor(ids, dtype=torch.long)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = torch.gather(logp, -1, torch.as_tensor(ids[:, 1:, None], dtype=torch.long))[..., 0]
    out = np.zeros(ids.shape, np.float64)
    out[:, 1:] = picked.double().numpy()
    return out
