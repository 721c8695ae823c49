"""Moved: the program is `python -m launch.execute` (--input, --output; the limits are
configs/execute.py's, e.g. --config.timeout=5)."""
import sys

if __name__ == "__main__":
    sys.exit("data_tools.execute is now `python -m launch.execute` (--input, --output; "
             "limits as --config.timeout=5 etc., configs/execute.py)")
