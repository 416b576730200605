import sys

from fbta.cli import main

sys.exit(main())
