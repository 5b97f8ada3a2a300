"""``python -m ssl_eval`` (and ``torchrun -m ssl_eval``): the ``ssl-eval`` command."""

import sys

from .cli import main

sys.exit(main())
