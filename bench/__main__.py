"""``python -m bench``: the checkpoint save/resume benchmark (see :mod:`bench.checkpoint`)."""

from __future__ import annotations

import sys

from bench.checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
