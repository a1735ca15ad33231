"""`python -m qlora.evaluate`: runs qlora.evaluation.evaluate (the code lives there)."""

import sys

from .evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
