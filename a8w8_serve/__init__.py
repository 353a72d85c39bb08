"""The a8w8-serve command line; ``a8w8_serve.main:main`` is the ``a8w8-serve`` entry point."""
