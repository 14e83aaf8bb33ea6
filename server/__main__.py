"""``python -m server`` is the ``presenced`` command."""

import sys

from server.cli import main

sys.exit(main())
