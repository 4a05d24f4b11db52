"""``python -m recsys_cli ...`` is the ``recsys`` command."""

import sys

from recsys_cli.main import main

sys.exit(main())
