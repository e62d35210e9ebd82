"""``python -m bloomwire`` runs the CLI."""

from bloomwire.cli import main

main()
