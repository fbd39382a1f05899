"""``python -m fastvlm``: the same as the ``fastvlm`` command."""

import sys

from .cli import main

sys.exit(main())
