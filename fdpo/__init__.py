"""fdpo: Focused-DPO in JAX (the library; programs are in launch/)."""
import logging as _logging


class _QuietTorchAdvice(_logging.Filter):
    """transformers logs "PyTorch was not found. Models won't be available..." at import when
    torch is absent, which is every user's install (fdpo uses transformers for tokenizers
    and configs only; torch is a test-only reference). Each program would print it to stderr
    before its own output; the filter drops that one message and nothing else."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found.")


_logging.getLogger("transformers").addFilter(_QuietTorchAdvice())
