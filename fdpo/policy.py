"""A policy for inference: a model loaded once, with what it takes to talk to it.

    policy = Policy.load(mesh, checkpoint="CKPT")          # or hf_dir="HF"
    [[c]] = policy.generate(["Write add(a, b)."], temperature=0.0, max_new_tokens=64)
    c.text, c.tokens, c.finish_reason                       # "eos", "stop" or "length"
    policy.score([ids]).logp_sum

Beside the parameters (cfg, graphdef, state, placed on the mesh by the sharding rules) it
holds the tokenizer, read from the tokenizer files alone (`fdpo.tokenization.load_tokenizer`:
an fdpo checkpoint and the Hugging Face directory it came from give the same ids), the
prompt format (`fdpo.tokenization.PROMPT_FORMATS`: chat_template, plain, magicoder, ...)
and the EOS set (`fdpo.sampling.eos_ids`). Every program that samples or scores goes through it, so a prompt
becomes the same tokens, and a response ends at the same tokens, in all of them and in the
data builder. Generation is `fdpo.sampling.Sampler`, scoring `fdpo.scoring.Scorer`.

A checkpoint without tokenizer files loads too (tokenizer None): it scores and generates
from token ids; what needs text raises.

Inputs are checked against the model before its weights are read: `ModelFiles.read` (which
`Policy.load` calls first) refuses a tokenizer with more tokens than the model has embedding
rows (`VocabError`: ids past the table give NaN log-probs, not an error), `ModelFiles.check_ids`
token ids outside the table, and `Policy.check_prompt_lengths` prompts longer than the sampler
has room for (`PromptTooLong`, before anything is generated).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Sequence

import numpy as np
from jax.sharding import Mesh

from fdpo import sampling, sharding
from fdpo.models.checkpoint import load_checkpoint_or_hf, read_config
from fdpo.models.config import ModelConfig
from fdpo.sampling import Completion, Sampler, SamplingParams
from fdpo.scoring import MAX_SEGMENT_LABELS, Scorer, ScoreResult
from fdpo.tokenization import Encoder, load_tokenizer

# Files any one of which makes a directory a tokenizer directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# Default row seed of sample j of prompt i: i * ROW_SEED_STRIDE + j.
ROW_SEED_STRIDE = 100_003


def encode_text(tokenizer, text: str) -> list[int]:
    """Text -> token ids as it is: no template, no special tokens, no EOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class VocabError(ValueError):
    """A tokenizer or token ids that do not fit the model's embedding table."""


class PromptTooLong(ValueError):
    """Prompts longer than the sampler has room for; `.lines`: one message per prompt."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """A model's config and tokenizer, read without its weights: enough to check inputs
    against the model (vocabulary, positions) before the expensive load. `tokenizer` is None
    when the directory holds no tokenizer files."""

    checkpoint: str | None
    hf_dir: str | None
    cfg: ModelConfig
    tokenizer: object
    tokenizer_dir: pathlib.Path

    @property
    def source(self) -> str:
        return str(self.checkpoint or self.hf_dir)

    @classmethod
    def read(cls, *, checkpoint: str | None = None, hf_dir: str | None = None) -> ModelFiles:
        """From exactly one of an fdpo checkpoint and a Hugging Face directory; raises
        VocabError when the tokenizer has more tokens than the model has embedding rows."""
        cfg, tok_dir = read_config(checkpoint=checkpoint, hf_dir=hf_dir)
        has_tokenizer = any((pathlib.Path(tok_dir) / f).is_file() for f in TOKENIZER_FILES)
        tokenizer = load_tokenizer(tok_dir) if has_tokenizer else None
        files = cls(checkpoint, hf_dir, cfg, tokenizer, pathlib.Path(tok_dir))
        if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
            raise VocabError(
                f"{tok_dir}: the tokenizer has {len(tokenizer)} tokens but the model has "
                f"{cfg.vocab_size} embedding rows (vocab_size of {files.source}); use the "
                "tokenizer the model was trained with")
        return files

    def check_ids(self, ids: Sequence[int], where: str) -> None:
        """Raises VocabError, naming `where`, the position and the vocabulary, when a token
        id lies outside [0, vocab_size)."""
        vocab = self.cfg.vocab_size
        arr = np.asarray(ids, np.int64)
        bad = np.nonzero((arr < 0) | (arr >= vocab))[0]
        if len(bad):
            raise VocabError(f"{where}: token id {arr[bad[0]]} at position {bad[0]} is outside "
                             f"the model's vocabulary [0, {vocab}) ({self.source})")


class Policy:
    """A model with its tokenizer, prompt format and EOS set; see the module docstring."""

    def __init__(self, cfg: ModelConfig, graphdef, state, mesh: Mesh, tokenizer=None, *,
                 tokenizer_dir: str | pathlib.Path | None = None, rules=sharding.DEFAULT_RULES,
                 prompt_format: str | None = None, length_bucket: int = 64,
                 stop_check_steps: int = 32, logprob_chunk: int = 256, refill: bool = True):
        self.cfg, self.graphdef, self.state, self.mesh = cfg, graphdef, state, mesh
        self.tokenizer = tokenizer
        self.tokenizer_dir = tokenizer_dir
        self.encoder = Encoder(tokenizer, prompt_format) if tokenizer is not None else None
        self.eos_ids = sampling.eos_ids(cfg, tokenizer, tokenizer_dir)
        pad = self.encoder.pad if self.encoder else (cfg.pad_token_id or 0)
        self.sampler = Sampler(cfg, graphdef, state, mesh, rules,
                               decode=self.decode if tokenizer is not None else None,
                               length_bucket=length_bucket, stop_check_steps=stop_check_steps,
                               pad_id=pad, refill=refill)
        self.scorer = Scorer(cfg, graphdef, state, mesh, rules, chunk=logprob_chunk)

    @classmethod
    def load(cls, mesh: Mesh, *, checkpoint: str | None = None, hf_dir: str | None = None,
             files: ModelFiles | None = None, compute_dtype: str | None = None,
             rules=sharding.DEFAULT_RULES, prompt_format: str | None = None,
             **options) -> Policy:
        """From exactly one of an fdpo checkpoint and a Hugging Face directory, or the
        `files` already read (and checked) from one. The tokenizer is checked against the
        model (`ModelFiles.read`, VocabError) before the weights are read.
        `compute_dtype` (None or "": the checkpoint's); `prompt_format` (None: the
        tokenizer's, see `fdpo.tokenization`); `options`: length_bucket, stop_check_steps,
        logprob_chunk, refill."""
        if files is None:
            files = ModelFiles.read(checkpoint=checkpoint, hf_dir=hf_dir)
        elif checkpoint is not None or hf_dir is not None:
            raise TypeError("give files= or checkpoint=/hf_dir=, not both")
        overrides = {"compute_dtype": compute_dtype} if compute_dtype else {}
        cfg, graphdef, state, tok_dir = load_checkpoint_or_hf(
            mesh, checkpoint=files.checkpoint, hf_dir=files.hf_dir, rules=rules, **overrides)
        return cls(cfg, graphdef, state, mesh, files.tokenizer, tokenizer_dir=tok_dir,
                   rules=rules, prompt_format=prompt_format, **options)

    # ------------------------------------------------------------------------------ text
    @property
    def prompt_format(self) -> str | None:
        return self.encoder.prompt_format if self.encoder else None

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.tokenizer_dir}: no tokenizer files; this policy takes "
                             "token ids only")

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Prompt strings rendered in the prompt format -> token ids, one list per prompt."""
        self._need_tokenizer()
        return [ids.tolist() for ids in self.encoder.prompts(list(prompts))]

    def encode_text(self, text: str) -> list[int]:
        """Text -> token ids as it is: no template, no special tokens, no EOS."""
        self._need_tokenizer()
        return encode_text(self.tokenizer, text)

    def decode(self, ids: Sequence[int]) -> str:
        self._need_tokenizer()
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | None = None, *, num_samples: int = 1, seed: int = 0,
                 row_seeds: Sequence[int] | None = None, batch_size: int = 64,
                 pad_rows_to: int | None = None, **sampling_fields) -> list[list[Completion]]:
        """`num_samples` completions of every prompt, [len(prompts)][num_samples].

        A prompt is a string, rendered in the prompt format, or token ids, taken as they
        are. How to sample: `params`, or SamplingParams' fields as keywords
        (max_new_tokens, temperature, top_k, top_p, stop); responses end at the policy's
        EOS set unless `params.eos_ids` says otherwise. Sample j of prompt i is row
        r = i * num_samples + j and draws from `row_seeds[r]` (default
        i * ROW_SEED_STRIDE + j) with `seed`, so it does not depend on `batch_size`, on
        refill or on the other prompts. The sampler has `batch_size` cache rows, padded to
        `pad_rows_to` (default: min(batch_size, rows)), so one shape compiles; with refill
        (the default) every row is queued for them and a finished row takes the next,
        without it they run `batch_size` at a time.
        """
        if params is None:
            params = SamplingParams(**sampling_fields)
        elif sampling_fields:
            raise TypeError("give params= or SamplingParams fields as keywords, not both")
        if params.eos_ids is None:
            params = dataclasses.replace(params, eos_ids=self.eos_ids)
        ids = self._prompt_ids(prompts)
        rows = [i for i in range(len(ids)) for _ in range(num_samples)]
        if row_seeds is None:
            row_seeds = [i * ROW_SEED_STRIDE + j for i in range(len(ids))
                         for j in range(num_samples)]
        if len(row_seeds) != len(rows):
            raise ValueError(f"{len(row_seeds)} row seeds for {len(rows)} rows")
        batch = max(batch_size, self.sampler.batch_multiple)
        pad_rows_to = min(batch, len(rows)) if pad_rows_to is None else pad_rows_to
        done = self.sampler.generate([ids[i] for i in rows], params, seed=seed,
                                     row_seeds=row_seeds, pad_rows_to=pad_rows_to,
                                     batch_rows=batch)
        return [done[i * num_samples:(i + 1) * num_samples] for i in range(len(ids))]

    def prompt_room(self, max_new_tokens: int) -> int:
        """The most prompt tokens `generate` takes with `max_new_tokens` (<= 0: none)."""
        return self.sampler.prompt_room(max_new_tokens)

    def check_prompt_lengths(self, prompts: Sequence[str] | Sequence[Sequence[int]],
                             max_new_tokens: int, names: Sequence[str]) -> None:
        """Raises PromptTooLong, one line per prompt named by `names[i]`, when a prompt
        (rendered in the prompt format, as `generate` renders it) is longer than
        `prompt_room(max_new_tokens)`: `generate` would stop at its batch."""
        room, positions = self.prompt_room(max_new_tokens), self.cfg.max_position_embeddings
        if room <= 0:
            raise PromptTooLong([f"max_new_tokens={max_new_tokens} leaves no room for a "
                                 f"prompt in the model's {positions} positions "
                                 f"(max_position_embeddings)"])
        lines = [f"{name}: the prompt is {len(ids)} tokens, more than the {room} the sampler "
                 f"has room for (max_position_embeddings {positions} less max_new_tokens "
                 f"{max_new_tokens}, in steps of length_bucket {self.sampler.length_bucket})"
                 for name, ids in zip(names, self._prompt_ids(prompts)) if len(ids) > room]
        if lines:
            raise PromptTooLong(lines)

    def _prompt_ids(self, prompts) -> list[list[int]]:
        texts = list(dict.fromkeys(p for p in prompts if isinstance(p, str)))
        rendered = dict(zip(texts, self.encode_prompts(texts))) if texts else {}
        return [rendered[p] if isinstance(p, str) else [int(t) for t in p] for p in prompts]

    # --------------------------------------------------------------------------- scoring
    def score(self, sequences: Sequence[Sequence[int]],
              segment_ids: Sequence[Sequence[int] | None] | None = None, *,
              batch_size: int = 8, length_bucket: int = 128,
              progress: Callable[[int], None] | None = None) -> ScoreResult:
        """Log-prob sums of token-id sequences [T_i]: over t >= 1 of log p(x_t | x_<t), in
        total and per segment label (`segment_ids[i]`: one label in 0..15 per token; a row
        without labels counts nothing in segments). Scored `batch_size` at a time, shortest
        first, lengths padded to a multiple of `length_bucket`; results in input order:
        logp_sum, num_tokens [N], segment_sums, segment_counts [N, 16]. `progress` is
        called with the number of sequences of each batch done."""
        n = len(sequences)
        out = ScoreResult(np.zeros(n, np.float32), np.zeros(n, np.int64),
                          np.zeros((n, MAX_SEGMENT_LABELS), np.float32),
                          np.zeros((n, MAX_SEGMENT_LABELS), np.int64))
        order = sorted(range(n), key=lambda i: len(sequences[i]))
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            seqs = [sequences[i] for i in idx]
            labels = None
            if segment_ids is not None and any(segment_ids[i] is not None for i in idx):
                labels = [segment_ids[i] if segment_ids[i] is not None else [-1] * len(s)
                          for i, s in zip(idx, seqs)]
            pad_to = -(-max(len(s) for s in seqs) // length_bucket) * length_bucket
            res = self.scorer.score(seqs, labels, pad_to=pad_to)
            out.logp_sum[idx], out.num_tokens[idx] = res.logp_sum, res.num_tokens
            out.segment_sums[idx], out.segment_counts[idx] = res.segment_sums, res.segment_counts
            if progress is not None:
                progress(len(idx))
        return out
