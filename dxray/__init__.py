"""dxray: audit what an image classifier has learned, with DiffExplainer."""

__version__ = "0.1.0"
