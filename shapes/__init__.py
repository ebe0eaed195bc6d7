"""The trained ``shapes`` model: drawn data, trainer, scorer and evaluation. Its weights ship in runtime/models/data."""
