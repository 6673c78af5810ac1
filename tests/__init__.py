"""The test suite: a package, so that its modules import the shared helper modules (and
pytest the conftest) under one name each, ``tests.<module>``, however pytest is started."""
