import sys

from dpcompile.cli import main

sys.exit(main())
