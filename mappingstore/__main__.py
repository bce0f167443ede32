"""``python -m mappingstore``: the same as the ``mappingstore`` console script."""

from .cli import main

main()
