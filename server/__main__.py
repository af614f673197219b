"""``python -m server`` runs the ``voxswap`` command, for environments without its entry point."""

from server.tools.cli import main

raise SystemExit(main())
