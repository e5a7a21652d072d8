import sys

from activemoe.cli import main

sys.exit(main())
