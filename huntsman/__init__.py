"""huntsman: the data-reduction service of the Huntsman Telescope."""

__version__ = "0.1.0"
