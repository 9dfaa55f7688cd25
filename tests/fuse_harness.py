"""``python -m tests.fuse_harness mount ...``: the real ``secretfs`` command with faults injected.

SECRETFS_TEST_FAULT names a file; opening it raises RuntimeError deep inside the daemon, and
looking up a name ``lookup-boom`` raises ValueError. Both must become EIO without taking the mount
down. Test-only: nothing in the product reads this variable.
"""

from __future__ import annotations

import os
import sys

from secretfs import cli, tree, volumes

FAULT = os.environ.get("SECRETFS_TEST_FAULT", "")
_content = volumes.Volumes.content
_lookup = tree.Tree.lookup


async def content(self: volumes.Volumes, inode: int) -> volumes.Rendered:
    node = self.tree[inode]
    if node.spec is not None and node.spec.path == FAULT:
        raise RuntimeError("injected fault")
    return await _content(self, inode)


def lookup(self: tree.Tree, parent: int, name: bytes) -> tree.Node | None:
    if name == b"lookup-boom":
        raise ValueError("injected fault")
    return _lookup(self, parent, name)


volumes.Volumes.content = content  # type: ignore[method-assign]
tree.Tree.lookup = lookup  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main())
