"""``python -m han_surgery ...``: the same as the ``han-surgery`` command."""

import sys

from .cli import main

sys.exit(main())
