"""``python -m i3cl_core.cli COMMAND ...`` (also what ``torchrun -m i3cl_core.cli train ...`` runs)."""

from __future__ import annotations

import sys

from i3cl_core.cli import main

if __name__ == "__main__":  # not on a plain import (tools that import every module of the package)
    sys.exit(main())
