"""Train a codec: `python -m train.main --config configs/tiny.py --workdir /tmp/run`.

Flags: `--config FILE.py[:VARIANT]`, `--config.KEY=VALUE` overrides, `--workdir DIR`,
`--distributed` (multi-host). Same as `codec-jax train`; the work is done by
`codec_jax.trainer.train_and_evaluate`, which notebooks can call directly.
"""

import sys

from codec_jax.trainer import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
