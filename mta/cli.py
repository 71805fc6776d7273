"""The ``mta`` command.  There are no subcommands yet; the server runs under ``twistd mta``."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    print("mta: no command yet; use twistd mta", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
