"""Runs at the start of every Python process the tests start (tests/site is on their
PYTHONPATH): the test-only nets of tiny_nets.py."""

import tiny_nets

tiny_nets.register()
