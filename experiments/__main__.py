"""``python -m experiments paper|study [--config PRESET] [--device D] [section.field=value ...]``."""

import sys

from experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
