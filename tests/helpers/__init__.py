"""Reusable test helpers (tiny tokenizers, fixtures data)."""
