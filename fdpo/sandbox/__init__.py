"""The sandboxed code executor (standard library only; no JAX): used by the data stage,
evaluation and the continuation analysis. See fdpo.sandbox.executor and docs/sandbox.md."""
