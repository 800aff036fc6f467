"""`python -m fastbn ...`: the `fastbn` command where its script is not on PATH."""

import sys

from fastbn.cli import main

sys.exit(main())
