"""`python -m attnlab`: the `attnlab` command (`attnlab.cli`), the only module that imports the CLI."""

import sys

from .cli import main

sys.exit(main())
