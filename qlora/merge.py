"""`python -m qlora.merge`: runs qlora.evaluation.merge (the code lives there)."""

import sys

from .evaluation.merge import main

if __name__ == "__main__":
    sys.exit(main())
