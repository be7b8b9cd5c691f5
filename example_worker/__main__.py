"""``python -m example_worker``: run the shop demo (see ``--help``)."""

from example_worker.runner import main

raise SystemExit(main())
