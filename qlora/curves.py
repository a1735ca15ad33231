"""`python -m qlora.curves`: runs qlora.training.curves (the code lives there)."""

import sys

from .training.curves import main

if __name__ == "__main__":
    sys.exit(main())
