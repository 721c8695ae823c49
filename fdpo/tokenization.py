"""Tokenizer loading, prompt formatting and response tokenisation, shared by the data
builder and the policy (no JAX).

Loading: `load_tokenizer` reads a tokenizer from its files alone. transformers would also
read a config.json beside them and may then pick another class (for model_type qwen2 it
takes Qwen2Tokenizer over the TokenizersBackend that tokenizer_config.json names, which
splits whitespace differently); an fdpo checkpoint keeps the tokenizer files without
config.json (`hf_extras/`), so reading only the files gives one tokenizer, and the same ids,
whether a model comes as a Hugging Face directory or as a checkpoint.

Prompt format (`PROMPT_FORMATS`, one name for every program: `prompt_format` in the
sample, build, evaluate and analyze configs, recorded in each problem record):

* "chat_template": the tokenizer's chat template applied to one user message, with the
  generation prompt (the default when the tokenizer has a template);
* "plain": the prompt as it is (the default otherwise);
* "magicoder": Magicoder's "@@ Instruction / @@ Response" layout with its system line;
* "deepseek_instruct": DeepSeek-Coder-Instruct's "### Instruction: / ### Response:" layout
  with its system line (for a copy of the tokenizer without its chat template).

The text layouts are tokenised with the tokenizer's own special tokens (e.g. BOS), as their
authors' scripts do. `render` gives the text, `Encoder.prompts` the ids. Responses are
tokenised on their own, without special tokens, with the EOS token appended.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
from transformers import AutoTokenizer, PreTrainedConfig

# Text layouts of instruction-tuned code models without a usable chat template, written
# from their authors' published usage ({instruction} is the user message).
#
# Magicoder (ise-uiuc/magicoder README.md, "Quick Start", the MAGICODER_PROMPT used with
# Magicoder-S-DS-6.7B; the tokenizer adds its BOS): system line, blank line,
# "@@ Instruction", the instruction, blank line, "@@ Response" and a newline.
MAGICODER_SYSTEM = ("You are an exceptionally intelligent coding assistant that consistently "
                    "delivers accurate and reliable responses to user instructions.")
# DeepSeek-Coder-Instruct (deepseek-ai/DeepSeek-Coder README.md, "Chat Model Inference", the
# template for use without apply_chat_template; finetune/finetune_deepseekcoder.py,
# build_instruction_prompt, which also strips the instruction): system line,
# "### Instruction:", the instruction, "### Response:" and a newline, one per line. The chat
# template shipped in the model's tokenizer_config.json words the system line slightly
# differently; a tokenizer that has it is better served by "chat_template".
DEEPSEEK_SYSTEM = ("You are an AI programming assistant, utilizing the DeepSeek Coder model, "
                   "developed by DeepSeek Company, and you only answer questions related to "
                   "computer science. For politically sensitive questions, security and "
                   "privacy issues, and other non-computer science questions, you will refuse "
                   "to answer.")
TEXT_LAYOUTS = {
    "plain": lambda p: p,
    "magicoder": lambda p: f"{MAGICODER_SYSTEM}\n\n@@ Instruction\n{p}\n\n@@ Response\n",
    "deepseek_instruct": lambda p: (f"{DEEPSEEK_SYSTEM}\n### Instruction:\n{p.strip()}\n"
                                    "### Response:\n"),
}
PROMPT_FORMATS = ("chat_template", *TEXT_LAYOUTS)


def resolve_prompt_format(tokenizer, prompt_format: str | None = None) -> str:
    """`prompt_format` checked against PROMPT_FORMATS and the tokenizer; None or "": the
    tokenizer's default ("chat_template" when it has a template, else "plain")."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not prompt_format:
        return "chat_template" if has_template else "plain"
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format={prompt_format!r}; expected one of {PROMPT_FORMATS}")
    if prompt_format == "chat_template" and not has_template:
        raise ValueError("prompt_format='chat_template' but the tokenizer has no chat template")
    return prompt_format


def render(tokenizer, prompts: list[str], prompt_format: str) -> list[str]:
    """The text of each prompt in `prompt_format` (a name resolve_prompt_format returns)."""
    if prompt_format == "chat_template":
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    return [TEXT_LAYOUTS[prompt_format](p) for p in prompts]


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer in directory `path`, from its tokenizer files only (see the module
    docstring): a blank model config stands in for any config.json there."""
    return AutoTokenizer.from_pretrained(str(path), config=PreTrainedConfig())


class Encoder:
    """Prompt and response tokenisation as described in the module docstring."""

    def __init__(self, tokenizer, prompt_format: str | None = None):
        self.tok = tokenizer
        self.prompt_format = prompt_format = resolve_prompt_format(tokenizer, prompt_format)
        self.chat = prompt_format == "chat_template"
        self.eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)
        self._newline: dict[int, bool] = {}

    def prompts(self, prompts: list[str]) -> list[np.ndarray]:
        texts = render(self.tok, list(prompts), self.prompt_format)
        # A rendered chat template spells its special tokens (the tokenizer maps them back);
        # the text layouts get the tokenizer's own (e.g. BOS).
        ids = self.tok(texts, add_special_tokens=not self.chat)["input_ids"] if texts else []
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
