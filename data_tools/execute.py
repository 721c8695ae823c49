"""Moved: the program is `python -m launch.execute` (same flags)."""
import sys

if __name__ == "__main__":
    sys.exit("data_tools.execute is now `python -m launch.execute` (same flags)")
