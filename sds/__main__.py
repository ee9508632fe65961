"""``sds`` / ``python -m sds``: the envoymesh discovery server."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``sds`` command (the server arrives with issue #3)."""
    del argv
    sys.exit("sds: not built yet (issue #3)")


if __name__ == "__main__":
    main()
