"""`python -m skyreels_local.bench`: the benchmark on a machine with only torch and diffusers."""

from .run import main

raise SystemExit(main())
