"""`python -m nas COMMAND ARGS…`: every console script without relying on installed scripts.

The dashboard starts its workers this way, with the interpreter it runs on.
"""

import sys

from nas.cli import main

if __name__ == "__main__":
    sys.exit(main())
