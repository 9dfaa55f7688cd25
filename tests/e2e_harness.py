"""``python -m tests.e2e_harness mount ...``: the real ``secretfs`` command, in a test's network.

The daemon is its own process, so the set-up the provider tests make in-process has to be made
here too: ``localhost`` and ``*.localhost`` resolve to 127.0.0.1 (RFC 6761 loopback names, which
this container's resolver does not implement), so the Azure test server's vaults
(``https://<vault>.localhost:<port>/``) are reachable under their real-looking host names. That is
the only patch; everything else (endpoints, CA bundles, credentials) reaches the daemon through its
documented environment variables. Test-only: nothing in the product imports this module.
"""

from __future__ import annotations

import sys

from secretfs import cli
from tests.azure_server import loopback_localhost

if __name__ == "__main__":
    with loopback_localhost():
        status = cli.main()
    sys.exit(status)
