"""``augpipe evaluate``: whether an augmented corpus helps, as a linear-probe A/B on frozen features.

corpus.py reads corpora (the one place that knows the reader), features.py gets their vectors (given
columns, or the ``embed`` stage in-process or on Ray), protocol.py runs the A/B, render.py shows it, and
command.py is the command line; the maths is in ``augpipe.methods.probe``.
"""
