import sys

from sd35dist.cli import main

sys.exit(main())
