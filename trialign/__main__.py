import sys

from trialign.cli import main

sys.exit(main())
