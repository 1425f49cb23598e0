"""`python -m moespac_gguf.cli`: the `moespac` command."""

import sys

from . import main

sys.exit(main())
