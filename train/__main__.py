"""``python -m train --config train/configs/debug.yaml [--key=value ...]`` (see train.fit)."""

from train.fit import main

raise SystemExit(main())
