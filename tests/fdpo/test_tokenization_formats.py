"""Named prompt formats (`fdpo.tokenization`): each renders the layout its model family was
trained on. The expected texts are written out here from the published layouts (Magicoder's
README, DeepSeek-Coder's README and fine-tuning script), not taken from the module."""
import pytest
from transformers import AutoTokenizer

from fdpo import tokenization as T
from tests.helpers.tokenizer import tiny_tokenizer_dirs  # noqa: F401  (fixture)

PROMPT = "Write a Python function that returns the sum of a list of numbers.\n"
EXPECTED = {
    "plain": PROMPT,
    "magicoder": (
        "You are an exceptionally intelligent coding assistant that consistently delivers "
        "accurate and reliable responses to user instructions.\n\n@@ Instruction\n"
        + PROMPT + "\n\n@@ Response\n"),
    # The instruction is stripped, as DeepSeek-Coder's build_instruction_prompt does.
    "deepseek_instruct": (
        "You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by "
        "DeepSeek Company, and you only answer questions related to computer science. For "
        "politically sensitive questions, security and privacy issues, and other non-computer "
        "science questions, you will refuse to answer.\n### Instruction:\n" + PROMPT.strip()
        + "\n### Response:\n"),
    # The tiny tokenizers' ChatML template (fdpo.testing.CHAT_TEMPLATE).
    "chat_template": f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def toks(tiny_tokenizer_dirs):  # noqa: F811
    return {k: AutoTokenizer.from_pretrained(v) for k, v in tiny_tokenizer_dirs.items()}


def test_every_format_has_an_expected_layout():
    assert set(EXPECTED) == set(T.PROMPT_FORMATS)


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
def test_format_renders_the_published_layout(toks, fmt):
    tok = toks["chat"]
    assert T.render(tok, [PROMPT], fmt) == [EXPECTED[fmt]]
    [ids] = T.Encoder(tok, fmt).prompts([PROMPT])
    # The chat template spells its special tokens; the text layouts get the tokenizer's own.
    want = tok(EXPECTED[fmt], add_special_tokens=fmt != "chat_template")["input_ids"]
    assert ids.tolist() == want
    if fmt == "chat_template":
        im_start = tok.convert_tokens_to_ids("<|im_start|>")
        assert ids[0] == im_start and (ids == im_start).sum() == 2


def test_text_layouts_do_not_need_a_template(toks):
    tok = toks["plain"]
    for fmt in ("plain", "magicoder", "deepseek_instruct"):
        assert T.Encoder(tok, fmt).prompt_format == fmt
    with pytest.raises(ValueError, match="no chat template"):
        T.Encoder(tok, "chat_template")


def test_default_and_unknown_names(toks):
    assert T.Encoder(toks["chat"]).prompt_format == "chat_template"
    assert T.Encoder(toks["plain"]).prompt_format == "plain"
    assert T.resolve_prompt_format(toks["chat"], "") == "chat_template"
    with pytest.raises(ValueError, match="expected one of"):
        T.Encoder(toks["chat"], "alpaca")
