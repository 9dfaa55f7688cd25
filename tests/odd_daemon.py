"""``python -m tests.odd_daemon daemon ...``: a secretfs daemon of an incompatible release.

It speaks hand-over protocol 99, so a keeper of this release must refuse to give it the FUSE
connection and keep its state for the next daemon (the rollback).
"""

from __future__ import annotations

import sys

from secretfs import cli, control

control.PROTOCOL = 99

if __name__ == "__main__":
    sys.exit(cli.main())
