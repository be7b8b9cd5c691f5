"""Interop with the real ``posthog`` package, through a real worker on Redis."""
