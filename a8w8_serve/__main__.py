"""``python -m a8w8_serve``: the ``a8w8-serve`` command."""

from a8w8_serve.main import main

main()
