"""`python -m pypeft ...`: the same as the `pypeft` command."""

import sys

from pypeft.cli import main

sys.exit(main())
