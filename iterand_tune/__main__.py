"""`python -m iterand_tune ...`: see iterand_tune.cli."""
from .cli import main

raise SystemExit(main())
