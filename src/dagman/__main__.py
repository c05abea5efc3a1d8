import sys

from dagman.cli import main

sys.exit(main())
