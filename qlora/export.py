"""`python -m qlora.export`: runs qlora.evaluation.export (the code lives there)."""

import sys

from .evaluation.export import main

if __name__ == "__main__":
    sys.exit(main())
