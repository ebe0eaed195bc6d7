"""``python -m sdtrt.cli``: the ``sdtrt`` command."""

from sdtrt.cli import main

if __name__ == "__main__":
    main()
