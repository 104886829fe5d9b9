"""`python -m upernet_ref.cli COMMAND ...` (what torchrun starts)."""
import sys

from upernet_ref.cli import main

sys.exit(main())
