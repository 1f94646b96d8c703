"""``python -m entrypoint`` is ``podtrain``."""

from entrypoint.early import main

raise SystemExit(main())
