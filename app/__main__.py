"""``python -m app <command> --config PRESET [--device D] [section.field=value ...]``."""

import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main())
