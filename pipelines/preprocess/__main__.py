"""``python -m pipelines.preprocess``: see :mod:`pipelines.preprocess.cli`."""
import sys

from pipelines.preprocess.cli import main

sys.exit(main())
