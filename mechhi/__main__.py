"""``python -m mechhi ...`` (and ``torchrun ... -m mechhi trace ...``): the command line."""

from mechhi.commands import main

if __name__ == "__main__":
    main()
