"""`python -m fasttune ...` is the `fasttune` command."""
import sys

from .cli import main

sys.exit(main())
