"""`python -m daemon` is the same as the `background-sync` command."""

from daemon.cli import main

main()
