"""``python -m vitsam``: the command line, as ``torchrun -m vitsam`` starts it in every process."""
import sys

from .cli import main

sys.exit(main())
