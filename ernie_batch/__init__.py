"""ernie-batch: folders of scanned documents -> a vision-language model -> rows in Delta tables."""

__version__ = "0.1.0"
