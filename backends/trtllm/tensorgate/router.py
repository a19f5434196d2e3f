"""Entry point of the router process: the Rust router, run through the compiled module."""

from __future__ import annotations

import sys


def main() -> None:
    from tensorgate import _router

    sys.exit(_router.run(["tensorgate-router", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
