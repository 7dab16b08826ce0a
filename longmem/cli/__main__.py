"""``python -m longmem.cli``: the ``longmem`` command."""

import os
import sys

from longmem.cli import main

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.exit(main())
