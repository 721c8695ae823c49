"""Tokenizer loading, prompt formatting and response tokenisation, shared by the data
builder and the policy (no JAX).

Loading: `load_tokenizer` reads a tokenizer from its files alone. transformers would also
read a config.json beside them and may then pick another class (for model_type qwen2 it
takes Qwen2Tokenizer over the TokenizersBackend that tokenizer_config.json names, which
splits whitespace differently); an fdpo checkpoint keeps the tokenizer files without
config.json (`hf_extras/`), so reading only the files gives one tokenizer, and the same ids,
whether a model comes as a Hugging Face directory or as a checkpoint.

Prompt format (`PROMPT_FORMATS`): "chat_template" applies the tokenizer's chat template to
one user message; "plain" tokenises the prompt as it is, with the tokenizer's own special
tokens (e.g. BOS). The default is "chat_template" when the tokenizer has one. Responses are
tokenised on their own, without special tokens, with the EOS token appended.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
from transformers import AutoTokenizer, PreTrainedConfig

PROMPT_FORMATS = ("chat_template", "plain")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer in directory `path`, from its tokenizer files only (see the module
    docstring): a blank model config stands in for any config.json there."""
    return AutoTokenizer.from_pretrained(str(path), config=PreTrainedConfig())


class Encoder:
    """Prompt and response tokenisation as described in the module docstring."""

    def __init__(self, tokenizer, prompt_format: str | None = None):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if prompt_format is None:
            prompt_format = "chat_template" if has_template else "plain"
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format={prompt_format!r}; expected one of {PROMPT_FORMATS}")
        if prompt_format == "chat_template" and not has_template:
            raise ValueError("prompt_format='chat_template' but the tokenizer has no chat template")
        self.tok = tokenizer
        self.prompt_format = prompt_format
        self.chat = prompt_format == "chat_template"
        self.eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)
        self._newline: dict[int, bool] = {}

    def prompts(self, prompts: list[str]) -> list[np.ndarray]:
        if self.chat:
            texts = [self.tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True) for p in prompts]
            # The rendered template spells its special tokens; the tokenizer maps them back.
            ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tok(prompts, add_special_tokens=True)["input_ids"]
        return [np.asarray(x, np.int64) for x in ids]

    def responses(self, texts: list[str]) -> list[np.ndarray]:
        # Duplicate samples are common at high temperature: tokenise each distinct text once.
        unique = list(dict.fromkeys(texts))
        ids = self.tok(unique, add_special_tokens=False)["input_ids"] if unique else []
        tail = [self.eos] if self.eos is not None else []
        by_text = {t: np.asarray(list(x) + tail, np.int64) for t, x in zip(unique, ids)}
        return [by_text[t] for t in texts]

    def newline_flags(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty(len(ids), bool)
        for k, i in enumerate(ids.tolist()):
            flag = self._newline.get(i)
            if flag is None:
                flag = self._newline[i] = "\n" in self.tok.decode([i])
            out[k] = flag
        return out

    def identity(self, path: str) -> dict[str, Any]:
        tok_json = os.path.join(path, "tokenizer.json")
        sha = None
        if os.path.isfile(tok_json):
            with open(tok_json, "rb") as f:
                sha = hashlib.sha256(f.read()).hexdigest()
        template = getattr(self.tok, "chat_template", None)
        return {
            "name_or_path": path,
            "class": type(self.tok).__name__,
            "vocab_size": len(self.tok),
            "tokenizer_json_sha256": sha,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None,
            "prompt_format": self.prompt_format,
            "eos_token_id": self.eos,
            "eos_appended": self.eos is not None,
            "pad_token_id_in_records": self.pad,
        }
