"""``python -m collapse_monitor report RUN_DIR`` (same as the ``collapse-monitor`` console script)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
