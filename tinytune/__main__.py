"""`python -m tinytune ...`: see `tinytune.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
