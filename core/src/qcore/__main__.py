"""``python -m qcore`` is the ``qcore`` command."""

from qcore.cli import main

raise SystemExit(main())
