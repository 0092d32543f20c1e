"""``python -m gcml_app.cli``: the ``gcml`` command."""

import sys

from gcml_app.cli import main

sys.exit(main())
