"""`python -m supervisor` runs the same CLI as `vram-supervisor`."""

import sys

from supervisor.cli import main

if __name__ == "__main__":
    sys.exit(main())
