"""python -m normengine: the same command line as the normengine script (normengine.cli)."""
import sys

from .cli import main

sys.exit(main())
