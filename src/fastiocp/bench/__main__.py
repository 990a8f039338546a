"""``python -m fastiocp.bench [ARGS]``: the same as ``python -m fastiocp bench [ARGS]``."""
import sys

from fastiocp.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
