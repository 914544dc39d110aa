"""``python -m knowedit``: the ``knowedit`` command, for launchers that start modules
(``torchrun -m knowedit eval SUITE``, ``accelerate launch -m knowedit eval SUITE``)."""
import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
