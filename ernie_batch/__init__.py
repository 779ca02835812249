"""ernie-batch: folders of scanned documents -> a vision-language model -> validated rows in Parquet."""

__version__ = "0.1.0"
