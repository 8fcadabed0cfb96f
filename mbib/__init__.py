"""mbib: Mixture of Balanced Information Bottlenecks (Lan et al.) for long-tailed recognition."""

__version__ = "0.1.0"
