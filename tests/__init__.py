"""The test suite; a package so that ``tests.harness`` and the worker apps
(``tests.e2e.worker_app``) have one name in pytest, in worker subprocesses and in ``bench``."""
