"""The one exception type for unusable input data."""


class DatasetError(ValueError):
    """Input data that cannot be used; the message names the file and the image/annotation id."""
