"""augpipe: offline cross-modal data augmentation on Ray."""

__version__ = "0.1.0"
