"""The `sprm` command: `main.py` holds the command table; each subcommand is a file of its own."""
