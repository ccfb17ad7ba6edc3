"""`python -m tuneforge`: the same command as `tuneforge` (accelerate launch -m tuneforge train ... uses it)."""

from tuneforge.cli import main

raise SystemExit(main())
