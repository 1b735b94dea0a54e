"""``python -m huntsman``."""

import sys

from huntsman.cli import main

sys.exit(main())
