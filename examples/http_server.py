"""A small HTTP/1.1 keep-alive server on one completion port, single thread.

    python examples/http_server.py [--port 8080] [--root DIR]

The server is written only on fastiocp's public API. Its code lives in the
package, src/fastiocp/bench/http_example.py (read it there), so that
``python -m fastiocp bench`` can drive it with wrk after ``pip install .``;
this file runs it.
"""
import sys

from fastiocp.bench.http_example import main

if __name__ == "__main__":
    sys.exit(main())
