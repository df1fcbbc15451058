"""``python -m common.cli`` = ``feda2v``."""

import sys

from common.cli import main

sys.exit(main())
