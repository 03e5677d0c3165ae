"""``python -m lycoris_kohya ...``: the lycoris-kohya command."""
import sys

from .tools.cli import main

sys.exit(main())
