import sys

from fastlora.cli import main

sys.exit(main())
