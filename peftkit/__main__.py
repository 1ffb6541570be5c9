"""``python -m peftkit``: the same as the ``peftkit`` command (and what ``accelerate launch -m
peftkit`` / ``torchrun -m peftkit`` start in each process)."""

from .cli import main

main()
