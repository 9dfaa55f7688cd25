"""``python -m tests.stock_pyfuse3 mount ...``: the real ``secretfs`` command as it runs on a stock
pyfuse3, which does not pass the inode to ``read()`` in no-open mode. The build of
scripts/build-pyfuse3.sh marks itself with ``pyfuse3.READ_INODE_WITHOUT_FH``; without the mark
secretfs must serve the OPEN path. Test-only: nothing in the product imports this module.
"""

from __future__ import annotations

import sys

import pyfuse3

if hasattr(pyfuse3, "READ_INODE_WITHOUT_FH"):
    delattr(pyfuse3, "READ_INODE_WITHOUT_FH")

from secretfs import cli

if __name__ == "__main__":
    sys.exit(cli.main())
