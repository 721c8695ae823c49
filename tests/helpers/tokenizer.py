"""A tiny byte-level BPE tokenizer trained offline, saved as a transformers tokenizer directory.

Use it wherever a test needs a real ``AutoTokenizer``-loadable tokenizer without downloads::

    from tests.helpers.tokenizer import build_tiny_tokenizer
    path = build_tiny_tokenizer(tmp_path / "tok", chat_template=True)

or, as a session-scoped pytest fixture (import it into the test module to use it)::

    from tests.helpers.tokenizer import tiny_tokenizer_dirs  # noqa: F401
    def test_x(tiny_tokenizer_dirs): AutoTokenizer.from_pretrained(tiny_tokenizer_dirs["chat"])

Training is deterministic for a fixed corpus and takes well under a second.
"""
from __future__ import annotations

import os
import pathlib

import pytest

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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


@pytest.fixture(scope="session")
def tiny_tokenizer_dirs(tmp_path_factory) -> dict[str, str]:
    """{"chat": dir with a ChatML template, "plain": dir without one}."""
    base = tmp_path_factory.mktemp("tiny_tokenizers")
    return {"chat": str(build_tiny_tokenizer(base / "chat", chat_template=True)),
            "plain": str(build_tiny_tokenizer(base / "plain", chat_template=False))}
