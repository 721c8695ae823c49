"""Tiny models, tokenizers and preference pairs built locally (no downloads), shared by the
tests and the benchmarks.

* `build_tiny_tokenizer`: a byte-level BPE trained offline on a small code corpus, saved as a
  transformers tokenizer directory (deterministic, well under a second).
* `random_pairs`, `stack`, `write_dataset`, `random_params`: synthetic preference pairs in the
  record layout, their batch arrays, a dataset directory, a random parameter tree.
* `make_hf_model`, `torch_token_logprobs`: tiny random Hugging Face checkpoints built with
  transformers and their PyTorch log-probs, for parity tests. They need torch, which is a
  test-only dependency (requirements-test.txt), so it is imported inside them.
"""
from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fdpo import records as rec
from fdpo.models import convert
from fdpo.records import PairRecord, Segment

# ---------------------------------------------------------------------------- tokenizer
# A ChatML-style template (the format Qwen2.5 uses), simplified: no system prompt injection.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "def sub(a, b):\n    return a - b\n",
    "def is_even(n):\n    return n % 2 == 0\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for i in range(10):\n    print(i)\n",
    "while x > 0:\n    x -= 1\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "assert add(1, 2) == 3\n",
    "Write a Python function that returns the sum of a list of numbers.",
    "import math\nresult = math.sqrt(16)\n",
    "def max_of(xs):\n    best = xs[0]\n    for x in xs:\n        if x > best:\n            best = x\n    return best\n",
]


def build_tiny_tokenizer(path: str | os.PathLike, chat_template: bool = False,
                         vocab_size: int = 400) -> pathlib.Path:
    """Trains a byte-level BPE on a small code corpus and saves it with ``save_pretrained``.

    The saved tokenizer has ``eos_token = "<|im_end|>"`` (as Qwen2.5-Instruct), ``pad_token =
    "<|endoftext|>"`` and, when ``chat_template`` is true, a ChatML template.
    """
    path = pathlib.Path(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    return path


# ------------------------------------------------------------------------------- pairs
def random_pairs(n: int, length: int, vocab: int, seed: int = 0,
                 lengths: tuple[tuple[int, int], ...] = ((2, 6), (0, 5), (1, 5), (0, 5), (0, 5)),
                 prose: tuple[int, int] | None = None) -> list[PairRecord]:
    """`lengths`: inclusive (lo, hi) token counts of prompt, prefix, chosen mid, rejected
    mid, suffix. `prose`: inclusive (lo, hi) token counts of LEAD and TRAIL (prose around an
    instruct response's code), drawn for each side on its own; None: no prose (and the same
    draws as before prose existed)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        p, pre, mc, mr, suf = (int(rng.integers(lo, hi + 1)) for lo, hi in lengths)
        prompt, prefix, suffix = (rng.integers(1, vocab, k) for k in (p, pre, suf))
        sides = {}
        for side, m in (("chosen", mc), ("rejected", mr)):
            lead = trail = np.zeros(0, np.int64)
            if prose is not None:
                lead, trail = (rng.integers(1, vocab, int(rng.integers(prose[0], prose[1] + 1)))
                               for _ in range(2))
            ids = np.concatenate([prompt, lead, prefix, rng.integers(1, vocab, m), suffix, trail])
            seg = [Segment.PROMPT] * p + [Segment.LEAD] * len(lead) + [Segment.PREFIX] * pre + \
                [Segment.MID] * m + [Segment.SUFFIX] * suf + [Segment.TRAIL] * len(trail)
            if len(ids) > length:
                raise ValueError(f"pair of {len(ids)} tokens does not fit length {length}")
            sides[side] = (np.pad(ids, (0, length - len(ids))).astype(np.int32),
                           np.pad(np.asarray(seg, np.int8), (0, length - len(ids))))
        records.append(PairRecord(sides["chosen"][0], sides["rejected"][0], sides["chosen"][1],
                                  sides["rejected"][1], pair_id=i, problem_id=i,
                                  problem_name=f"p{i}"))
    return records


def random_params(cfg, seed: int = 0, scale: float = 0.1) -> dict:
    """A random pure-dict parameter tree for `cfg`, drawn with numpy (eager `Decoder`
    initialisation dispatches one small compiled op per parameter: seconds per model)."""
    abstract = nnx.to_pure_dict(nnx.split(convert.abstract_model(cfg))[1])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = scale * rng.standard_normal(leaf.shape)
        if str(getattr(path[-1], "key", "")) == "scale":  # RMSNorm scales around 1
            x = 1.0 + x
        return jax.numpy.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def stack(records: list[PairRecord]) -> dict[str, np.ndarray]:
    """Records -> the dict of [n, ...] arrays grain's batching produces."""
    dicts = [r.to_dict() for r in records]
    return {k: np.stack([d[k] for d in dicts]) for k in dicts[0]}


def write_dataset(out_dir, splits: dict[str, list[PairRecord]], shards: int = 2) -> str:
    """Writes each split as `shards` ArrayRecord files plus `manifest.json` (the layout
    `data_tools.build` writes); returns the manifest path."""
    os.makedirs(out_dir, exist_ok=True)
    max_len = next(iter(splits.values()))[0].max_len
    manifest_splits = {}
    for name, items in splits.items():
        entries = []
        for s in range(shards):
            part = items[s::shards]
            path = f"{name}-{s:05d}-of-{shards:05d}.array_record"
            rec.write_array_record(os.path.join(out_dir, path), part)
            entries.append({"path": path, "records": len(part)})
        manifest_splits[name] = {"records": len(items), "shards": entries}
    manifest = rec.make_manifest(max_len=max_len, tokenizer={"name": "synthetic"},
                                 counts={"pairs": sum(len(v) for v in splits.values())},
                                 drop_reasons={}, splits=manifest_splits,
                                 config={"synthetic": True})
    path = os.path.join(out_dir, "manifest.json")
    rec.write_manifest(path, manifest)
    return path


# ------------------------------------------------------------ Hugging Face (torch) models
def make_hf_model(out_dir: pathlib.Path, arch: str, *, seed: int = 0, dtype: str = "float32",
                  max_shard_size: str | None = None, legacy_config: bool = False, **kw):
    """Builds, randomises and saves a tiny model; returns the torch model (eval mode).
    `dtype`: the torch dtype's name ("float32", "bfloat16").

    HF initialises biases to zero and norms to one; both are randomised so a dropped bias
    or a misplaced norm cannot hide. `legacy_config` rewrites config.json the way
    transformers 4.x wrote it (rope_theta and rope_scaling at the top level).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

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
    model = model.to(getattr(torch, dtype))
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
    import torch

    with torch.no_grad():
        logits = model(torch.as_tensor(ids, dtype=torch.long)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = torch.gather(logp, -1, torch.as_tensor(ids[:, 1:, None], dtype=torch.long))[..., 0]
    out = np.zeros(ids.shape, np.float64)
    out[:, 1:] = picked.double().numpy()
    return out
