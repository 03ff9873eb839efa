"""``python -m llm_gateway.cli``."""

import sys

from . import main

sys.exit(main())
