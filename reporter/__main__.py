"""``python -m reporter`` is ``anylearn-reporter``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
