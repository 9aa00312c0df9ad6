"""mta: a high-volume outbound Mail Transfer Agent."""

__version__ = "0.1.0"
