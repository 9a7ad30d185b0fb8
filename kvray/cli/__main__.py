"""`python -m kvray.cli …`, as the tests and the launcher call it."""

from kvray.cli.app import main

main()
