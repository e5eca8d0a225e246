"""`python -m serving`: the predictor's entry point in the serving image (same as `flywheel serve`)."""

import sys

from flywheel.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
