"""End-to-end tests: a real ``celery worker`` subprocess, real Redis and RabbitMQ, events
received by the loopback collector."""
