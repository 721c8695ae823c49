"""The tiny tokenizers as session-scoped fixtures (import them into the test module)::

    from tests.helpers.tokenizer import tiny_tokenizer_dirs  # noqa: F401
    def test_x(tiny_tokenizer_dirs): AutoTokenizer.from_pretrained(tiny_tokenizer_dirs["chat"])

    from tests.helpers.tokenizer import tiny_tokenizer_dirs, tok, tok_dir  # noqa: F401
    def test_y(tok_dir, tok): ...   # the ChatML one: its directory and the loaded tokenizer
"""
import pytest

from fdpo.testing import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dirs(tmp_path_factory) -> dict[str, str]:
    """{"chat": dir with a ChatML template, "plain": dir without one}."""
    base = tmp_path_factory.mktemp("tiny_tokenizers")
    return {"chat": str(build_tiny_tokenizer(base / "chat", chat_template=True)),
            "plain": str(build_tiny_tokenizer(base / "plain", chat_template=False))}


@pytest.fixture(scope="session")
def tok_dir(tiny_tokenizer_dirs) -> str:
    """The directory of the tokenizer with a ChatML template."""
    return tiny_tokenizer_dirs["chat"]


@pytest.fixture(scope="session")
def tok(tok_dir):
    """`tok_dir`'s tokenizer, loaded by transformers."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tok_dir)
