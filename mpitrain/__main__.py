"""``python -m mpitrain``: thread counts are fixed before NumPy loads, then the CLI runs."""
import sys

from mpitrain.threads import configure_env

configure_env()

from mpitrain.cli import main  # noqa: E402  (after the thread environment is set)

sys.exit(main())
