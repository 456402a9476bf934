"""The `support-gateway` executable: pipe-mode `ingest` on a fast path, else the full CLI.

`ingest` runs once per message under the MTA, so it must not pay for importing the whole
application (gateway/pipe.py); every other command goes to gateway/cli.py.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from gateway.pipe import fast_main

    args = sys.argv[1:] if argv is None else argv
    rc = fast_main(args)
    if rc is not None:
        return rc
    from gateway.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
