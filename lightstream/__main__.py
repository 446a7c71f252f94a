"""``python -m lightstream``: the ``lightstream`` console command."""

from lightstream.cli import main

if __name__ == "__main__":
    main()
