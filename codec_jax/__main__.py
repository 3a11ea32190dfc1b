import sys

from codec_jax.cli import main

sys.exit(main())
