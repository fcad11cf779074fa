"""`python -m library_store ...`: see library_store/cli.py."""
from library_store.cli import main

raise SystemExit(main())
