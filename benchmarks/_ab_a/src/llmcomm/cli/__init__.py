"""``llmcomm`` command line: ``doctor``, ``demo``, ``bench``."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmcomm", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    from . import demo, doctor

    doctor.add_parser(sub)
    demo.add_parser(sub)
    try:
        from . import bench
    except ImportError:  # pragma: no cover - bench ships with llmcomm
        bench = None
    if bench is not None:
        bench.add_parser(sub)
    args = parser.parse_args(argv)
    from ..config import get_config

    logging.basicConfig(level=getattr(logging, get_config().log_level, logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
