"""Problem synthesis from concepts (``python -m launch.synthesize``).

    python -m launch.synthesize --config configs/synthesize.py --concepts C.jsonl \\
        --hf_dir HF --out PROMPTS.jsonl --config.per_concept=8 --config.sampling.temperature=0.7

The generation templates ask the policy for one problem in a fixed Markdown layout, which
:func:`data_tools.synthesize.parse_problem` reads back: ``## Description``, ``## Signature``
(a fenced ``def`` line with an optional docstring, no body) and ``## Examples`` (fenced
``assert`` lines that call the function). ``{concepts}`` is replaced by one bullet per concept.
The solve template renders a validated problem into the prompt that ``launch.sample`` gives
the policy.
"""
import ml_collections

GENERATION_TEMPLATES = (
    """You write programming exercises. Write ONE new, self-contained Python programming problem
that exercises the following concepts:
{concepts}

Answer in exactly this format and write nothing else:

## Description
<the task in plain English: inputs, output, edge cases; two to six sentences>

## Signature
```python
def function_name(arg: type, ...) -> type:
```

## Examples
```python
assert function_name(...) == ...
assert function_name(...) == ...
```

Do NOT write the solution: the signature section holds only the `def` line (a docstring is
allowed), and no section contains an implementation.""",
    """Design a short coding interview question in Python built around:
{concepts}

The question must be solvable by one function using only the standard library. Reply with
these three sections and nothing else:

## Description
<what the function must do, including input constraints and edge cases>

## Signature
```python
def function_name(...) -> ...:
```

## Examples
```python
assert function_name(...) == ...
```

Give two to four examples as assert statements. Never include the function body or a
solution.""",
)

SOLVE_TEMPLATE = """{description}

Complete the following Python function:
```python
{signature}
```

Examples:
```python
{examples}
```"""


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.generation_templates = GENERATION_TEMPLATES  # used round robin over requests
    c.solve_template = SOLVE_TEMPLATE
    c.per_concept = 4  # problem requests per concept (each gets one generation)
    c.samples_per_request = 1
    c.max_concepts_per_problem = 3  # the seed concept plus up to 2 others
    c.kinds = ("api", "construct", "pattern")  # concept kinds used as seeds and partners
    c.max_seed_concepts = 0  # 0: every concept of the file is a seed; else the most frequent N
    c.seed = 0
    c.id_prefix = "syn"

    c.sampling = ml_collections.ConfigDict()
    c.sampling.temperature = 0.8
    c.sampling.top_p = 0.95
    c.sampling.max_new_tokens = 768
    c.sampling.batch_size = 16

    c.validation = ml_collections.ConfigDict()
    c.validation.min_description_chars = 40
    c.validation.min_examples = 1
    c.validation.max_examples = 10

    c.dedupe = ml_collections.ConfigDict()
    c.dedupe.ngram = 3  # word n-grams of the normalised description + signature
    c.dedupe.jaccard = 0.7  # at or above: near duplicate of an earlier problem
    c.dedupe.max_postings = 200  # n-grams shared by more problems are too common to find candidates

    # Against the benchmark files given with --decontaminate (nothing without them).
    c.decontaminate = ml_collections.ConfigDict()
    c.decontaminate.ngram = 13  # word n-grams of the normalised text, the usual decontamination n
    c.decontaminate.min_shared = 1  # shared with one benchmark task: at or above, rejected
    return c
