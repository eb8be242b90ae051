"""`python -m proclip_train.cli ...` = `proclip ...` (what `torchrun -m` and `accelerate launch -m` run)."""

from . import main

main()
