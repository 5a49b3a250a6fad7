"""``python -m scd_train.play RUN`` is ``scd-play RUN``."""

import sys

from scd_train.play.cli import main

sys.exit(main())
