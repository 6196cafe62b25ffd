import sys

from sparsen.cli import main

sys.exit(main())
