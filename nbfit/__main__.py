"""Allow ``python -m nbfit``."""

import sys

from nbfit.cli import main

if __name__ == "__main__":
    sys.exit(main())
