"""`python -m pcmnet ...` (also `accelerate launch -m pcmnet train ...`)."""
import sys

from .cli import main

sys.exit(main())
