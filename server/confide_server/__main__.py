"""``python -m confide_server`` runs the ``confide-server`` CLI."""

import sys

from confide_server.cli import main

sys.exit(main())
