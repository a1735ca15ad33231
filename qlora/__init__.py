"""qlora: QLoRA fine-tuning building blocks; the loop itself lives in train.py.

Importing qlora silences the dependency messages that ask nothing of the user, by their source
(`qlora.quiet` lists each logger and warning source and why); everything else still prints.
"""

from . import quiet

quiet.install()
