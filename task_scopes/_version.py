# The newest release in CHANGELOG.md (`nox -s changelog` checks it): bump the two together.
__version__ = "0.1.0"
