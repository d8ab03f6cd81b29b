"""``python -m qcore`` is the ``qcore`` command."""

from qcore._cli import main

raise SystemExit(main())
