"""`python -m skyreels_local.worker`: how the supervisor starts a worker process."""

from .main import main

raise SystemExit(main())
