import sys

from secretfs.cli import main

sys.exit(main())
