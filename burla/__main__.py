import sys

from burla.cli import main

sys.exit(main())
