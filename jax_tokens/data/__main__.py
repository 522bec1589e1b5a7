"""``python -m jax_tokens.data prepare|info --dataset NAME --data_dir DIR``."""

import sys

from jax_tokens.data.cli import main

sys.exit(main())
