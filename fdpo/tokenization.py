"""Prompt formatting and response tokenisation, shared by the data builder and the sampler
(no JAX): a chat template applied to one user message when the tokenizer has one, else the
plain prompt with the tokenizer's own special tokens; responses tokenised on their own,
without special tokens, with the EOS token appended."""
from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np


class Encoder:
    """Prompt and response tokenisation as described in the module docstring."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
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
            "prompt_format": "chat_template" if self.chat else "plain",
            "eos_token_id": self.eos,
            "eos_appended": self.eos is not None,
            "pad_token_id_in_records": self.pad,
        }
