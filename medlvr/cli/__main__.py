import sys

from medlvr.cli import main

sys.exit(main())
