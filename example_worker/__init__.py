"""A small "shop" Celery app instrumented with task_scopes, and a demo that runs it.

``python -m example_worker`` needs no server: it starts the loopback collector, the shop's
WSGI web app on loopback, a ``filesystem://`` broker in a temporary folder and a real
prefork ``celery worker``; three shoppers' browsers post their checkouts with posthog-js's
tracing headers, and it prints what the collector received, grouped per user. It exits 0
only when every expected event arrived attributed to the right user.

Modules:
    app      the Celery app, configured the way we recommend (``app.conf`` + ``install``)
    tasks    the shop's tasks: business events, a chain, a chord, a retry, a failure
    web      the WSGI web app in ``task_scopes.wsgi.ContextMiddleware``: the view tags the
             plan and calls ``.delay()``; the middleware knows the user
    browser  the shoppers' browsers: ``POST /checkout`` with ``X-POSTHOG-*`` headers
    plan     the shoppers and, explicitly, the events each one must produce
    check    matching received events against the plan; the table
    runner   the command line: broker, collector, worker, requests, verdict
    _filesystem  kombu's filesystem:// transport with atomic message writes (demo broker)
"""
