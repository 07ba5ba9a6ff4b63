"""``python -m monitor report RUN_DIR`` (same as the ``collapse-monitor`` console script)."""

import sys

from .report import main

sys.exit(main())
