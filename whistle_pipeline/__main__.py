"""`python -m whistle_pipeline` — the same as the `whistle` command (and what `accelerate launch -m` runs)."""

from whistle_pipeline.cli import main

main()
