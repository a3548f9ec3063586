"""``python -m jaxmt.cli``: the same as the ``jaxmt`` command."""

import sys

from jaxmt.cli import main

sys.exit(main())
