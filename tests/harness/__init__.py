"""Support code the test suite and the benchmarks share.

* :mod:`tests.harness.redis_server`: a private ``redis-server`` on a free loopback port;
* :mod:`tests.harness.worker`: a ``celery worker`` subprocess, its log and its processes;
* :mod:`tests.harness.rabbitmq`: names that keep a run's RabbitMQ objects apart, and their
  deletion.

Nothing here imports pytest: the benchmarks (``bench/``) import these modules with the
repository root on ``sys.path``, and the tests never import from ``bench``.
"""
