"""``python -m entrypoint`` is ``podtrain``."""

from entrypoint.cli import main

raise SystemExit(main())
