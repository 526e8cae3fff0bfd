"""``python -m job``: the same entry point as the ``migrate-job`` console script."""

from __future__ import annotations

import sys

from job.cli import main

sys.exit(main())
