"""`python -m spacesync`: the same as the `spacesync` command."""

import sys

from .cli import main

sys.exit(main())
