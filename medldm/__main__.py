import sys

from medldm.cli import main

sys.exit(main())
