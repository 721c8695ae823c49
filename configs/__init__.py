"""ml-collections configs, one `get_config(arg)` per file (big_vision style). Configs import
only ml_collections (and configs.common); programs name their default config by `path`."""
import os


def path(name: str) -> str:
    """The absolute path of configs/NAME, for a program's default --config."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
