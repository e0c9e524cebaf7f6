"""Stages: one module per stage, named as the stage (``augpipe.stages.transcribe`` is ``transcribe``)."""
