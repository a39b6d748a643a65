"""`python -m captioner ...` (also what `torchrun -m captioner` runs)."""

from captioner.cli import console

console()
