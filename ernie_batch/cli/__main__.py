"""`python -m ernie_batch.cli`: the same as the `ernie-batch` command."""

from ernie_batch.cli import main

main()
