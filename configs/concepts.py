"""Concept mining (`python -m launch.concepts`): which concepts are kept, which files read.

    python -m launch.concepts --source=DIR --source=DIR2 --out=CONCEPTS.jsonl \
        [--config.min_count=2 --config.exclude_dirs='("site-packages", "venv")']
"""
import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.min_count = 2  # drop concepts with fewer occurrences
    c.min_files = 1  # drop concepts seen in fewer files
    c.drop_local = True  # drop APIs of the scanned trees' own modules
    c.max_file_bytes = 2_000_000  # larger .py files are generated tables: skipped, counted
    c.exclude_dirs = ("site-packages", "dist-packages", "node_modules", "venv")  # not entered
    c.lock()
    return c
