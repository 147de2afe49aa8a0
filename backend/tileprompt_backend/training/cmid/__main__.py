"""``torchrun ... -m tileprompt_backend.training.cmid``: the same command as ``tileprompt train cmid``."""

import sys

from .train import main

sys.exit(main(prog="python -m tileprompt_backend.training.cmid"))
