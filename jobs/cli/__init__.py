"""The `glan` command line: one module per command, output formats, and one-line errors."""
