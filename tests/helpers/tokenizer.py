"""The tiny tokenizers as a session-scoped fixture (import it into the test module)::

    from tests.helpers.tokenizer import tiny_tokenizer_dirs  # noqa: F401
    def test_x(tiny_tokenizer_dirs): AutoTokenizer.from_pretrained(tiny_tokenizer_dirs["chat"])
"""
import pytest

from fdpo.testing import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dirs(tmp_path_factory) -> dict[str, str]:
    """{"chat": dir with a ChatML template, "plain": dir without one}."""
    base = tmp_path_factory.mktemp("tiny_tokenizers")
    return {"chat": str(build_tiny_tokenizer(base / "chat", chat_template=True)),
            "plain": str(build_tiny_tokenizer(base / "plain", chat_template=False))}
