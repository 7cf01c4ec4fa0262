"""``python -m trkit <stage>``: see :mod:`trkit.cli`."""

from trkit.cli import main

raise SystemExit(main())
