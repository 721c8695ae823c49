"""Runs `python -m MODULE ARGS...` with an audit hook that logs every file this process
opens for writing, creates, renames or removes (Python-level: what C++ libraries such as
tensorstore write is not seen). Used by tests/launch/test_multiprocess_programs.py to check
that process 1 of a multi-process run writes none of the outputs process 0 owns.

    python tests/helpers/write_audit.py LOG MODULE ARGS...
"""
import os
import runpy
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def main():
    log_path, module, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    log = open(log_path, "a", buffering=1, encoding="utf-8")
    write = log.write  # bound before the hook: the log's own writes are not events

    def hook(event, a):
        path = None
        if event == "open" and a[0] is not None and not isinstance(a[0], int):
            mode, flags = a[1] or "", a[2] or 0
            if any(c in str(mode) for c in "wax+") or flags & _WRITE_FLAGS:
                path = a[0]
        elif event in ("os.rename", "shutil.copyfile"):
            path = a[1]  # the destination
        elif event in ("os.remove", "os.mkdir", "os.rmdir", "os.truncate", "shutil.rmtree"):
            path = a[0]
        if path is not None and not isinstance(path, int):
            write(f"{event}\t{os.path.abspath(os.fsdecode(path))}\n")

    sys.addaudithook(hook)
    sys.argv = [module, *args]
    sys.path[0] = os.getcwd()  # as `python -m`: the checkout, not this file's folder
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
