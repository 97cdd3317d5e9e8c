"""wdstudy: compare L2 regularization with decoupled weight decay."""

__version__ = "0.1.0"
