import sys

from weatherpeft.cli import main

sys.exit(main())
