"""``python -m bloomwire`` runs the CLI."""

from bloomwire.app.cli import main

main()
