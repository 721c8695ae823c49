"""Benchmark evaluation (HumanEval(+), MBPP(+), LiveCodeBench) in the sandboxed executor.

`tasks`: loading and the per-split executor tests; `runner`: running, pass@k, reports;
`_cell`: the code that runs inside the sandbox (oracles, time limits). No jax, except in
`generation` (samples from the policy, and the whole evaluation as `launch.evaluate` runs it).
"""
