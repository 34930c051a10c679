import sys

from modalign.cli import main

sys.exit(main())
