"""``python -m mamlkit``: see ``mamlkit._cli``."""

import os
import sys

from ._cli import main
from ._distributed import launched_by_torchrun

if __name__ == "__main__":
    code = main()
    if launched_by_torchrun():  # a rank ends without tearing down torch's threads: gloo's and the
        sys.stdout.flush()  # launcher's store client can abort a clean exit when the launcher
        sys.stderr.flush()  # closes first (seen about once in twenty runs)
        os._exit(code)
    sys.exit(code)
