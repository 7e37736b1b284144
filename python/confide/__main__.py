"""``python -m confide`` runs the ``confide`` command."""

import sys

from confide.cli import main

sys.exit(main())
