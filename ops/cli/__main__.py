"""``python -m ops.cli`` = ``feda2v``."""

import sys

from ops.cli import main

sys.exit(main())
