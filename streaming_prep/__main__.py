"""``python -m streaming_prep`` is the same as ``pike-prep``."""

import sys

from streaming_prep.cli import main

sys.exit(main())
