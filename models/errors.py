"""The error a builder raises for an argument it cannot take."""


class ArgumentError(ValueError):
    """A builder or registry argument is out of range or unknown.

    A ValueError, as keras.applications raises for its arguments. `argument`
    names the keyword (e.g. "dropout") so that a command line can say which
    of its options it was; the message itself assumes no command line.
    """

    def __init__(self, message, *, argument=None):
        super().__init__(message)
        self.argument = argument
