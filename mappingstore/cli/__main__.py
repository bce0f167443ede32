"""``python -m mappingstore.cli``: the same as the ``mappingstore`` console script."""

from . import main

main()
