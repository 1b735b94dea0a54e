"""``python -m huntsman``: the command line, as the ``huntsman`` script runs it."""

import sys

from huntsman.cli import main

sys.exit(main())
